//! Progress bars for a run: one overall bar plus one per running node (indicatif), drawn on
//! stderr only when it is a terminal and `-q` was not given.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use slider_engine::{Event, Observer};

pub struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    nodes: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Bars {
        let target = if quiet || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} nodes {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Bars {
            multi,
            overall,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    fn node_bar(&self, node: &str, kind: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("  {spinner} {prefix} {elapsed} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(format!("{node} ({kind})"));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    }

    pub fn finish(&self) {
        self.overall.finish_and_clear();
        let _ = self.multi.clear();
    }
}

impl Observer for Bars {
    fn event(&self, event: Event<'_>) {
        let Ok(mut nodes) = self.nodes.lock() else {
            return;
        };
        match event {
            Event::Planned { nodes: n } => self.overall.set_length(n as u64),
            Event::Cached { .. } | Event::Skipped { .. } => self.overall.inc(1),
            Event::Started { node, kind } => {
                let bar = self.node_bar(node, kind);
                nodes.insert(node.to_string(), bar);
            }
            Event::Progress { node, progress } => {
                if let Some(bar) = nodes.get(node) {
                    if let (Some(step), Some(total)) = (progress.step, progress.total) {
                        let loss = progress
                            .loss
                            .map(|l| format!(" loss {l:.4}"))
                            .unwrap_or_default();
                        bar.set_message(format!("step {step}/{total}{loss}"));
                    } else if let Some(m) = &progress.message {
                        bar.set_message(m.clone());
                    }
                }
            }
            Event::Finished { node, .. } => {
                if let Some(bar) = nodes.remove(node) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                self.overall.inc(1);
            }
        }
    }
}

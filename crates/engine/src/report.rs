//! The run report: one static HTML file beside the lockfile (`eyesize.yaml` ->
//! `eyesize.report.html`) saying what a run did: the node graph and each node's state and
//! time, the training loss curves, the published grids and the slider-quality figures.
//! Everything is inline (SVG, CSS) except the grids, which are linked by relative paths.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::path::{Component, Path, PathBuf};

use slider_protocol::quality::{QualityFile, SPEARMAN_GOAL, figure};
use slider_recipe::{Input, NodeParams, Plan};

use crate::fsutil::write_atomic;
use crate::{Manifest, NodeReport, RunSummary, Store, WorkerKind, kind_versions};

/// Where the report of `recipe` goes: beside its lockfile, `eyesize.yaml` ->
/// `eyesize.report.html`.
pub fn report_path(recipe: &Path) -> PathBuf {
    recipe.with_extension("report.html")
}

/// Writes the report of a finished run; returns its path, or warns and returns `None` when it
/// cannot be written (the run's outputs are what matters, not this page).
pub fn write_or_warn(
    plan: &Plan,
    summary: &RunSummary,
    worker_kinds: &[WorkerKind],
) -> Option<PathBuf> {
    let path = report_path(&plan.recipe_path);
    let html = render(&gather(plan, summary, worker_kinds, &path));
    match write_atomic(&path, html.as_bytes()) {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!("could not write the run report: {e}");
            None
        }
    }
}

/// Why a loss curve or a quality table is missing from the page; shown there and in a
/// warning, never returned to the caller.
#[derive(Debug, thiserror::Error)]
enum ReportError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("parsing {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("expected a `step,loss,...` header, found `{0}`")]
    LossHeader(String),
    #[error("no loss values")]
    NoLossValues,
}

/// Everything the page shows, read from the plan, the summary and the store.
struct Report {
    recipe: PathBuf,
    store: PathBuf,
    lockfile: Option<PathBuf>,
    kind_versions: BTreeMap<String, u32>,
    wall_s: f64,
    interrupted: bool,
    publish_errors: Vec<String>,
    nodes: Vec<NodeRow>,
    /// `(input node, consumer)`, indices into `nodes`.
    edges: Vec<(usize, usize)>,
    losses: Vec<(String, Result<LossCurve, String>)>,
    grids: Vec<Grid>,
    quality: Vec<(String, Result<QualityFile, String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ran,
    Cached,
    Failed,
    NotRun,
}

impl State {
    fn class(self) -> &'static str {
        match self {
            State::Ran => "ran",
            State::Cached => "cached",
            State::Failed => "failed",
            State::NotRun => "notrun",
        }
    }

    fn label(self) -> &'static str {
        match self {
            State::Ran => "ran",
            State::Cached => "cached",
            State::Failed => "failed",
            State::NotRun => "not run",
        }
    }
}

struct NodeRow {
    name: String,
    kind: String,
    state: State,
    /// Seconds this run spent on it (ran, failed).
    wall_s: Option<f64>,
    /// Seconds it took when it ran, from its store manifest (cached nodes).
    recorded_wall_s: Option<f64>,
    error: Option<String>,
    inputs: Vec<String>,
}

struct Grid {
    node: String,
    /// Relative URL from the report to the published PNG.
    src: String,
    size: Option<(u32, u32)>,
}

fn gather(plan: &Plan, summary: &RunSummary, worker_kinds: &[WorkerKind], report: &Path) -> Report {
    let report_dir = report.parent().unwrap_or(Path::new("."));
    let store = Store::at(&summary.store);
    let mut outcome: HashMap<&str, (State, &NodeReport)> = HashMap::new();
    for (state, list) in [
        (State::Ran, &summary.ran),
        (State::Cached, &summary.cached),
        (State::Failed, &summary.failed),
        (State::NotRun, &summary.skipped),
    ] {
        for r in list {
            outcome.insert(r.name.as_str(), (state, r));
        }
    }
    let index = plan.index_by_name();

    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    let mut manifests: Vec<Option<Manifest>> = Vec::new();
    for (i, node) in plan.nodes.iter().enumerate() {
        let (state, r) = match outcome.get(node.name.as_str()) {
            Some(&(state, r)) => (state, Some(r)),
            None => (State::NotRun, None),
        };
        let manifest = match (state, r.and_then(|r| r.key.as_deref())) {
            (State::Ran | State::Cached, Some(key)) => store.manifest(key).unwrap_or_else(|e| {
                tracing::warn!("run report: no store record of `{}`: {e}", node.name);
                None
            }),
            _ => None,
        };
        let mut inputs = Vec::new();
        for input in node.params.inputs() {
            let text = match input {
                Input::Node(name) => {
                    if let Some(&from) = index.get(name.as_str())
                        && !edges.contains(&(from, i))
                    {
                        edges.push((from, i));
                    }
                    name.clone()
                }
                Input::File(path) => relative_path(&plan.root, path).display().to_string(),
            };
            if !inputs.contains(&text) {
                inputs.push(text);
            }
        }
        nodes.push(NodeRow {
            name: node.name.clone(),
            kind: node.params.kind().to_string(),
            state,
            wall_s: match state {
                State::Ran | State::Failed => r.map(|r| r.wall_s),
                _ => None,
            },
            recorded_wall_s: manifest.as_ref().map(|m| m.wall_s),
            error: r.and_then(|r| r.error.clone()),
            inputs,
        });
        manifests.push(manifest);
    }

    let mut losses = Vec::new();
    for (node, manifest) in plan.nodes.iter().zip(&manifests) {
        let (NodeParams::Train(_), Some(m)) = (&node.params, manifest) else {
            continue;
        };
        let Some(file) = m.outputs.iter().find(|o| o.name == "loss") else {
            continue;
        };
        let path = store.object_dir(&m.key).join(&file.file);
        let curve = std::fs::read_to_string(&path)
            .map_err(|source| ReportError::Read {
                path: path.clone(),
                source,
            })
            .and_then(|text| parse_loss_csv(&text))
            .map_err(|e| e.to_string());
        match &curve {
            Ok(c) if !c.skipped_lines.is_empty() => tracing::warn!(
                "run report: skipped malformed lines {:?} of {}",
                c.skipped_lines,
                path.display()
            ),
            Err(e) => tracing::warn!("run report: no loss curve for `{}`: {e}", node.name),
            Ok(_) => {}
        }
        losses.push((node.name.clone(), curve));
    }

    let mut grids = Vec::new();
    let mut quality = Vec::new();
    // In plan order, inputs before consumers, as the table reads.
    for node in &plan.nodes {
        let name = &node.name;
        let Some(dest) = plan.outputs.get(name) else {
            continue;
        };
        if !summary.published.contains(dest) {
            continue;
        }
        let ext = dest
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => grids.push(Grid {
                node: name.clone(),
                src: url_path(&relative_path(report_dir, dest)),
                size: png_size(dest),
            }),
            Some("json") if matches!(node.params, NodeParams::Evaluate(_)) => {
                let parsed = std::fs::read(dest)
                    .map_err(|source| ReportError::Read {
                        path: dest.clone(),
                        source,
                    })
                    .and_then(|bytes| {
                        serde_json::from_slice::<QualityFile>(&bytes).map_err(|source| {
                            ReportError::Parse {
                                path: dest.clone(),
                                source,
                            }
                        })
                    })
                    .map_err(|e| e.to_string());
                if let Err(e) = &parsed {
                    tracing::warn!("run report: no quality table for `{name}`: {e}");
                }
                quality.push((name.clone(), parsed));
            }
            _ => {}
        }
    }

    Report {
        recipe: plan.recipe_path.clone(),
        store: summary.store.clone(),
        lockfile: summary.lockfile.clone(),
        kind_versions: kind_versions(worker_kinds),
        wall_s: summary.wall_s,
        interrupted: summary.interrupted,
        publish_errors: summary.publish_errors.clone(),
        nodes,
        edges,
        losses,
        grids,
        quality,
    }
}

const STYLE: &str = "\
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1em}\
table{border-collapse:collapse;margin:.5em 0 1em}\
th,td{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}\
td.num{text-align:right;font-variant-numeric:tabular-nums}\
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:bold}dd{margin:0}\
.error{color:#a00}.muted{color:#666}\
rect.ran,.legend .ran,td.ran{fill:#a6dba0;background:#a6dba0}\
rect.cached,.legend .cached,td.cached{fill:#c6dbef;background:#c6dbef}\
rect.failed,.legend .failed,td.failed{fill:#f4a582;background:#f4a582}\
rect.notrun,.legend .notrun,td.notrun{fill:#eee;background:#eee}\
rect{stroke:#555}rect.notrun{stroke-dasharray:4 3}\
.legend span{display:inline-block;padding:0 .5em;margin-right:.4em;border:1px solid #999}\
svg text{font-size:12px;font-family:system-ui,sans-serif}svg text.kind{fill:#555;font-size:11px}\
svg .edge{stroke:#777;fill:none}svg .axis{stroke:#333}\
svg .raw{stroke:#9ecae1;fill:none}svg .avg{stroke:#08519c;fill:none;stroke-width:2}\
figure{display:inline-block;margin:0 1.5em 1em 0;vertical-align:top}\
img{image-rendering:pixelated}";

fn render(r: &Report) -> String {
    let title = r
        .recipe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>slider-run: {t}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>slider-run report: {t}</h1>\n",
        t = esc(&title)
    );
    render_header(&mut out, r);
    render_nodes(&mut out, r);
    render_losses(&mut out, r);
    render_grids(&mut out, r);
    render_quality(&mut out, r);
    out.push_str("</body>\n</html>\n");
    out
}

fn render_header(out: &mut String, r: &Report) {
    let count = |s: State| r.nodes.iter().filter(|n| n.state == s).count();
    let versions: Vec<String> = r
        .kind_versions
        .iter()
        .map(|(k, v)| format!("{k} v{v}"))
        .collect();
    let _ = write!(
        out,
        "<dl>\n<dt>recipe</dt><dd><code>{}</code></dd>\n\
         <dt>store</dt><dd><code>{}</code></dd>\n\
         <dt>lockfile</dt><dd>{}</dd>\n\
         <dt>code</dt><dd>slider-run {} (executors: {})</dd>\n\
         <dt>this run</dt><dd>{} ran, {} cached, {} failed, {} not run in {:.2} s{}</dd>\n</dl>\n",
        esc(&r.recipe.display().to_string()),
        esc(&r.store.display().to_string()),
        match &r.lockfile {
            Some(p) => format!("<code>{}</code>", esc(&p.display().to_string())),
            None => "not written (the run did not finish every node)".to_string(),
        },
        esc(env!("CARGO_PKG_VERSION")),
        esc(&versions.join(", ")),
        count(State::Ran),
        count(State::Cached),
        count(State::Failed),
        count(State::NotRun),
        r.wall_s,
        if r.interrupted { ", interrupted" } else { "" },
    );
    for e in &r.publish_errors {
        let _ = writeln!(out, "<p class=\"error\">not published: {}</p>", esc(e));
    }
}

fn render_nodes(out: &mut String, r: &Report) {
    out.push_str("<h2>Nodes</h2>\n<p class=\"legend\">");
    for s in [State::Ran, State::Cached, State::Failed, State::NotRun] {
        let _ = write!(out, "<span class=\"{}\">{}</span>", s.class(), s.label());
    }
    out.push_str("</p>\n");
    out.push_str(&dag_svg(&r.nodes, &r.edges));
    out.push_str(
        "<table>\n<tr><th>node</th><th>kind</th><th>state</th><th>wall time</th><th>inputs</th></tr>\n",
    );
    for n in &r.nodes {
        let time = match (n.state, n.wall_s, n.recorded_wall_s) {
            (State::Ran | State::Failed, Some(s), _) => format!("{s:.2} s"),
            (State::Cached, _, Some(s)) => format!("{s:.2} s when it ran"),
            (State::Cached, _, None) => "cached".to_string(),
            _ => String::new(),
        };
        let error = match &n.error {
            Some(e) => format!("<br><span class=\"error\">{}</span>", esc(e)),
            None => String::new(),
        };
        let inputs: Vec<String> = n
            .inputs
            .iter()
            .map(|i| format!("<code>{}</code>", esc(i)))
            .collect();
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}{error}</td><td class=\"num\">{time}</td><td>{}</td></tr>",
            esc(&n.name),
            esc(&n.kind),
            n.state.class(),
            n.state.label(),
            inputs.join("<br>"),
        );
    }
    out.push_str("</table>\n");
}

fn render_losses(out: &mut String, r: &Report) {
    if r.losses.is_empty() {
        return;
    }
    out.push_str("<h2>Training loss</h2>\n");
    for (node, curve) in &r.losses {
        let _ = writeln!(out, "<h3>{}</h3>", esc(node));
        match curve {
            Ok(c) => {
                out.push_str(&loss_svg(c));
                let window = average_window(c.points.len());
                let _ = write!(
                    out,
                    "<p class=\"muted\">{} steps, last loss {}; dark line: moving average over {window} step{}",
                    c.points.len(),
                    c.points.last().map_or(String::new(), |p| fmt_num(p.1)),
                    if window == 1 { "" } else { "s" },
                );
                if !c.skipped_lines.is_empty() {
                    let _ = write!(
                        out,
                        "; <span class=\"error\">{} malformed lines skipped</span>",
                        c.skipped_lines.len()
                    );
                }
                out.push_str("</p>\n");
            }
            Err(e) => {
                let _ = writeln!(out, "<p class=\"error\">no loss curve: {}</p>", esc(e));
            }
        }
    }
}

fn render_grids(out: &mut String, r: &Report) {
    if r.grids.is_empty() {
        return;
    }
    out.push_str("<h2>Grids</h2>\n");
    for g in &r.grids {
        // Tiny models make tiny grids: scale them up by a whole factor, pixels kept sharp.
        let size = match g.size {
            Some((w, h)) if w > 0 => {
                let scale = (480 / w).clamp(1, 4);
                format!(" width=\"{}\" height=\"{}\"", w * scale, h * scale)
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "<figure><img src=\"{}\" alt=\"{n}\"{size}><figcaption>{n}</figcaption></figure>",
            esc(&g.src),
            n = esc(&g.node),
        );
    }
}

fn render_quality(out: &mut String, r: &Report) {
    if r.quality.is_empty() {
        return;
    }
    out.push_str("<h2>Slider quality</h2>\n");
    for (node, q) in &r.quality {
        match q {
            Ok(q) => out.push_str(&quality_table(node, q)),
            Err(e) => {
                let _ = writeln!(
                    out,
                    "<h3>{}</h3>\n<p class=\"error\">{}</p>",
                    esc(node),
                    esc(e)
                );
            }
        }
    }
}

/// The node graph as SVG: one column per layer (longest path from a source), edges from
/// each input to its consumer, boxes coloured by state.
fn dag_svg(nodes: &[NodeRow], edges: &[(usize, usize)]) -> String {
    const BOX_W: f64 = 180.0;
    const BOX_H: f64 = 38.0;
    const COL_GAP: f64 = 60.0;
    const ROW_GAP: f64 = 12.0;
    const PAD: f64 = 10.0;
    let layer = layers(nodes.len(), edges);
    let columns = order_columns(&layer, edges);
    let tallest = columns.iter().map(Vec::len).max().unwrap_or(0);
    // An empty plan still makes a (blank) drawing of a valid size.
    let width = (2.0 * PAD + columns.len() as f64 * (BOX_W + COL_GAP) - COL_GAP).max(2.0 * PAD);
    let height = (2.0 * PAD + tallest as f64 * (BOX_H + ROW_GAP) - ROW_GAP).max(2.0 * PAD);
    let mut pos = vec![(0.0, 0.0); nodes.len()];
    for (l, column) in columns.iter().enumerate() {
        let offset = (tallest - column.len()) as f64 * (BOX_H + ROW_GAP) / 2.0;
        for (row, &i) in column.iter().enumerate() {
            pos[i] = (
                PAD + l as f64 * (BOX_W + COL_GAP),
                PAD + offset + row as f64 * (BOX_H + ROW_GAP),
            );
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg class=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\">"
    );
    out.push_str(
        "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#777\"/></marker></defs>\n",
    );
    for &(from, to) in edges {
        let (x1, y1) = (pos[from].0 + BOX_W, pos[from].1 + BOX_H / 2.0);
        let (x2, y2) = (pos[to].0, pos[to].1 + BOX_H / 2.0);
        let xm = (x1 + x2) / 2.0;
        let _ = writeln!(
            out,
            "<path class=\"edge\" d=\"M{x1:.1},{y1:.1} C{xm:.1},{y1:.1} {xm:.1},{y2:.1} {x2:.1},{y2:.1}\" marker-end=\"url(#arrow)\"/>"
        );
    }
    for (n, &(x, y)) in nodes.iter().zip(&pos) {
        let _ = writeln!(
            out,
            "<g><title>{name} ({kind}): {state}</title><rect class=\"{class}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{BOX_W}\" height=\"{BOX_H}\" rx=\"4\"/>\
             <text x=\"{tx:.1}\" y=\"{ty1:.1}\">{short}</text><text class=\"kind\" x=\"{tx:.1}\" y=\"{ty2:.1}\">{kind}</text></g>",
            name = esc(&n.name),
            kind = esc(&n.kind),
            state = n.state.label(),
            class = n.state.class(),
            tx = x + 6.0,
            ty1 = y + 16.0,
            ty2 = y + 31.0,
            short = esc(&shorten(&n.name, 26)),
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Each node's layer: the length of the longest path to it from a node without inputs.
fn layers(n: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let mut preds = vec![0usize; n];
    let mut succs = vec![Vec::new(); n];
    for &(from, to) in edges {
        preds[to] += 1;
        succs[from].push(to);
    }
    let mut layer = vec![0; n];
    let mut ready: Vec<usize> = (0..n).filter(|&i| preds[i] == 0).collect();
    while let Some(i) = ready.pop() {
        for &s in &succs[i] {
            layer[s] = layer[s].max(layer[i] + 1);
            preds[s] -= 1;
            if preds[s] == 0 {
                ready.push(s);
            }
        }
    }
    layer
}

/// The nodes of each layer, top to bottom: the first layer in plan order, each later one by
/// the mean row of its inputs (fewer crossing edges), ties in plan order.
fn order_columns(layer: &[usize], edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let count = layer.iter().max().map_or(0, |&m| m + 1);
    let mut columns: Vec<Vec<usize>> = vec![Vec::new(); count];
    for (i, &l) in layer.iter().enumerate() {
        columns[l].push(i);
    }
    let mut row = vec![0.0f64; layer.len()];
    for column in &mut columns {
        let key = |i: usize| {
            let inputs: Vec<f64> = edges
                .iter()
                .filter(|e| e.1 == i)
                .map(|e| row[e.0])
                .collect();
            if inputs.is_empty() {
                f64::INFINITY
            } else {
                inputs.iter().sum::<f64>() / inputs.len() as f64
            }
        };
        let mut keyed: Vec<(f64, usize)> = column.iter().map(|&i| (key(i), i)).collect();
        keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        *column = keyed.into_iter().map(|(_, i)| i).collect();
        // Rows centred like the drawing, so later layers compare positions, not indices.
        let offset = -(column.len() as f64) / 2.0;
        for (r, &i) in column.iter().enumerate() {
            row[i] = offset + r as f64;
        }
    }
    columns
}

/// A training run's `loss.csv` (`step,loss,lr`, one row per step).
#[derive(Debug, Clone, PartialEq)]
struct LossCurve {
    /// `(step, loss)`.
    points: Vec<(f64, f64)>,
    /// 1-based line numbers of rows that were not `step,loss,...` numbers (or a loss that is
    /// not finite); they are left out of the plot.
    skipped_lines: Vec<usize>,
}

fn parse_loss_csv(text: &str) -> Result<LossCurve, ReportError> {
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, l)| l.trim()).unwrap_or("");
    let mut columns = header.split(',').map(str::trim);
    if columns.next() != Some("step") || columns.next() != Some("loss") {
        return Err(ReportError::LossHeader(header.to_string()));
    }
    let mut points = Vec::new();
    let mut skipped_lines = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let mut fields = line.split(',').map(str::trim);
        let step = fields.next().and_then(|s| s.parse::<u64>().ok());
        let loss = fields.next().and_then(|s| s.parse::<f64>().ok());
        match (step, loss) {
            (Some(step), Some(loss)) if loss.is_finite() => points.push((step as f64, loss)),
            _ => skipped_lines.push(i + 1),
        }
    }
    if points.is_empty() {
        return Err(ReportError::NoLossValues);
    }
    Ok(LossCurve {
        points,
        skipped_lines,
    })
}

/// Steps averaged by the smooth line: a twentieth of the run, at least 5 (or the whole of a
/// shorter run), at most 100.
fn average_window(n: usize) -> usize {
    (n / 20).clamp(5, 100).min(n.max(1))
}

/// Trailing moving average: element `i` is the mean of the `window` values ending at `i`
/// (fewer at the start).
fn moving_average(values: &[f64], window: usize) -> Vec<f64> {
    let window = window.max(1);
    let mut sum = 0.0;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            sum += v;
            if i >= window {
                sum -= values[i - window];
            }
            sum / (i + 1).min(window) as f64
        })
        .collect()
}

/// Loss against step as SVG: the raw values and their moving average, axes labelled with
/// their minimum and maximum.
fn loss_svg(c: &LossCurve) -> String {
    const W: f64 = 520.0;
    const H: f64 = 220.0;
    const LEFT: f64 = 70.0;
    const RIGHT: f64 = 12.0;
    const TOP: f64 = 12.0;
    const BOTTOM: f64 = 34.0;
    let range = |v: &mut dyn Iterator<Item = f64>| {
        v.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(x), hi.max(x))
        })
    };
    let (x_min, x_max) = range(&mut c.points.iter().map(|p| p.0));
    let (y_min, y_max) = range(&mut c.points.iter().map(|p| p.1));
    let x_span = if x_max > x_min { x_max - x_min } else { 1.0 };
    let y_span = if y_max > y_min { y_max - y_min } else { 1.0 };
    let sx = |x: f64| LEFT + (x - x_min) / x_span * (W - LEFT - RIGHT);
    let sy = |y: f64| H - BOTTOM - (y - y_min) / y_span * (H - TOP - BOTTOM);
    let polyline = |ys: &mut dyn Iterator<Item = f64>| {
        let pts: Vec<String> = c
            .points
            .iter()
            .zip(ys)
            .map(|(p, y)| format!("{:.1},{:.1}", sx(p.0), sy(y)))
            .collect();
        pts.join(" ")
    };
    let losses: Vec<f64> = c.points.iter().map(|p| p.1).collect();
    let avg = moving_average(&losses, average_window(losses.len()));
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
    format!(
        "<svg class=\"loss\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">\n\
         <path class=\"axis\" d=\"M{x0},{y0} L{x0},{y1} L{x1},{y1}\" fill=\"none\"/>\n\
         <polyline class=\"raw\" points=\"{raw}\"/>\n<polyline class=\"avg\" points=\"{smooth}\"/>\n\
         <text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{ymax}</text>\n\
         <text x=\"{lx}\" y=\"{y1}\" text-anchor=\"end\">{ymin}</text>\n\
         <text x=\"{lx}\" y=\"{mid:.1}\" text-anchor=\"end\">loss</text>\n\
         <text x=\"{x0}\" y=\"{bx}\" text-anchor=\"start\">{xmin}</text>\n\
         <text x=\"{x1}\" y=\"{bx}\" text-anchor=\"end\">{xmax}</text>\n\
         <text x=\"{xmid:.1}\" y=\"{bx}\" text-anchor=\"middle\">step</text>\n</svg>\n",
        raw = polyline(&mut losses.iter().copied()),
        smooth = polyline(&mut avg.iter().copied()),
        lx = LEFT - 6.0,
        ty = TOP + 10.0,
        mid = (y0 + y1) / 2.0,
        bx = H - 12.0,
        xmid = (x0 + x1) / 2.0,
        ymax = fmt_num(y_max),
        ymin = fmt_num(y_min),
        xmin = fmt_num(x_min),
        xmax = fmt_num(x_max),
    )
}

fn quality_table(node: &str, q: &QualityFile) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<h3>{} (slider <code>{}</code>)</h3>\n<p class=\"muted\">{} seeds x {} weights per prompt; \
         change: mean absolute pixel difference (0-255) to the weight-0 image, outside vs inside the eyes \
         (a smaller ratio is better).</p>",
        esc(node),
        esc(&q.lora),
        q.seeds.len(),
        q.weights.len(),
    );
    let _ = writeln!(
        out,
        "<table class=\"quality\">\n<tr><th>prompt</th><th>Spearman(eye size, weight)</th>\
         <th>goal &ge; {SPEARMAN_GOAL}</th><th>outside / inside</th><th>outside change</th>\
         <th>inside change</th></tr>"
    );
    let rows = q
        .prompts
        .iter()
        .map(|p| (esc(&p.prompt), &p.figures))
        .chain([("<b>all prompts (pooled)</b>".to_string(), &q.pooled)]);
    for (prompt, f) in rows {
        let goal = f.goal();
        let _ = writeln!(
            out,
            "<tr><td>{prompt}</td><td class=\"num\">{}</td><td>{goal}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            figure(f.spearman, 3),
            figure(f.outside_inside_ratio, 3),
            figure(f.outside_change, 2),
            figure(f.inside_change, 2),
        );
    }
    out.push_str("</table>\n");
    out
}

/// A number for an axis label: 4 significant-ish digits, scientific when very small or large.
fn fmt_num(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e9 {
        format!("{v:.0}")
    } else if v.abs() >= 1e4 || v.abs() < 1e-3 {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// Escapes text for HTML content and attribute values (and SVG inside HTML).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters, the cut marked with an ellipsis.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut short: String = s.chars().take(max.saturating_sub(1)).collect();
    short.push('\u{2026}');
    short
}

/// `to` relative to the directory `from`, both made lexical first (`.` dropped, `..`
/// applied) as a browser resolves a relative URL. `to` unchanged unless both are absolute.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    if !from.is_absolute() || !to.is_absolute() {
        return to.to_path_buf();
    }
    let (from, to) = (lexical(from), lexical(to));
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c);
    }
    rel
}

fn lexical(path: &Path) -> Vec<Component<'_>> {
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if matches!(out.last(), Some(Component::Normal(_))) {
                    out.pop();
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// A relative path as a URL path: bytes other than unreserved characters and `/`
/// percent-encoded.
fn url_path(path: &Path) -> String {
    let mut out = String::new();
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Width and height from a PNG's header, `None` if the file is not a readable PNG.
fn png_size(path: &Path) -> Option<(u32, u32)> {
    use std::io::Read;
    let mut head = [0u8; 24];
    std::fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    if &head[..8] != b"\x89PNG\r\n\x1a\n" || &head[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| b.try_into().ok().map(u32::from_be_bytes);
    Some((be(&head[16..20])?, be(&head[20..24])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_run(dir: &Path) -> (Plan, RunSummary) {
        let plan = Plan {
            recipe_path: dir.join("r.yaml"),
            root: dir.to_path_buf(),
            nodes: vec![],
            graph: Default::default(),
            outputs: BTreeMap::new(),
        };
        let summary = RunSummary {
            ran: vec![],
            cached: vec![],
            failed: vec![],
            skipped: vec![],
            interrupted: false,
            wall_s: 0.5,
            hashed_bytes: 0,
            published: vec![],
            publish_errors: vec![],
            lockfile: None,
            store: dir.join(".slider"),
            keys: BTreeMap::new(),
        };
        (plan, summary)
    }

    #[test]
    fn the_report_goes_beside_the_lockfile_and_a_failed_write_only_warns() {
        let dir = tempfile::tempdir().unwrap();
        let (plan, summary) = empty_run(dir.path());
        let path = write_or_warn(&plan, &summary, &[]).expect("written");
        assert_eq!(path, dir.path().join("r.report.html"));
        let html = std::fs::read_to_string(&path).unwrap();
        assert!(html.contains("0 ran, 0 cached, 0 failed, 0 not run in 0.50 s"));
        assert!(html.contains(
            "<svg class=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"20\" height=\"20\""
        ));

        // A directory where the file should go: no report, and no error for the run.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert_eq!(write_or_warn(&plan, &summary, &[]), None);
    }

    #[test]
    fn text_is_escaped_for_content_and_attributes() {
        let cases = [
            ("plain_name", "plain_name"),
            (
                "<script>alert('x')</script>",
                "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;",
            ),
            ("a & b \"c\"", "a &amp; b &quot;c&quot;"),
            ("&amp;", "&amp;amp;"),
            ("ünïcode ok", "ünïcode ok"),
        ];
        for (raw, want) in cases {
            assert_eq!(esc(raw), want, "{raw}");
        }
    }

    #[test]
    fn layers_are_longest_paths_from_the_sources() {
        // A diamond a -> {b, c} -> d with a shortcut a -> d, then d -> e; node 5 stands
        // alone; g hangs off c only.
        let (a, b, c, d, e, g) = (0, 1, 2, 3, 4, 6);
        let edges = [(a, b), (a, c), (b, d), (c, d), (a, d), (d, e), (c, g)];
        assert_eq!(layers(7, &edges), vec![0, 1, 1, 2, 3, 0, 2]);
        // Listing order does not matter.
        let mut reversed = edges;
        reversed.reverse();
        assert_eq!(layers(7, &reversed), vec![0, 1, 1, 2, 3, 0, 2]);
    }

    fn row(name: &str, state: State) -> NodeRow {
        NodeRow {
            name: name.into(),
            kind: "merge".into(),
            state,
            wall_s: None,
            recorded_wall_s: None,
            error: None,
            inputs: vec![],
        }
    }

    /// `(x, y)` of each node's box in the SVG, by name.
    fn boxes(svg: &str) -> HashMap<String, (f64, f64)> {
        let mut out = HashMap::new();
        for g in svg.split("<g>").skip(1) {
            let name = g["<title>".len()..].split(' ').next().unwrap().to_string();
            let attr = |k: &str| -> f64 {
                let start = g.find(&format!(" {k}=\"")).unwrap() + k.len() + 3;
                g[start..].split('"').next().unwrap().parse().unwrap()
            };
            out.insert(name, (attr("x"), attr("y")));
        }
        out
    }

    #[test]
    fn the_graph_puts_each_layer_in_a_column_and_draws_every_edge() {
        let nodes = vec![
            row("a", State::Ran),
            row("b<&>", State::Cached),
            row("c", State::Failed),
            row("d", State::NotRun),
        ];
        let edges = [(0, 1), (0, 2), (1, 3), (2, 3)];
        let svg = dag_svg(&nodes, &edges);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert_eq!(svg.matches("class=\"edge\"").count(), edges.len());
        assert!(svg.contains("b&lt;&amp;&gt;") && !svg.contains("b<&>"));
        for class in ["ran", "cached", "failed", "notrun"] {
            assert!(svg.contains(&format!("<rect class=\"{class}\"")), "{class}");
        }
        let at = boxes(&svg);
        let (xa, ya) = at["a"];
        let (xb, yb) = at["b&lt;&amp;&gt;"];
        let (xc, yc) = at["c"];
        let (xd, yd) = at["d"];
        assert!(xa < xb && xb == xc && xc < xd, "one column per layer");
        assert!(yb < yc, "b above c, in plan order");
        assert_eq!(ya, yd, "single nodes centred on the same line");
        assert!(
            (ya - (yb + yc) / 2.0).abs() < 1e-9,
            "a centred beside b and c"
        );
    }

    #[test]
    fn later_layers_follow_their_inputs_order() {
        // Inputs x (row 0) and y (row 1); consumers listed as "from y" then "from x".
        let layer = [0, 0, 1, 1];
        let edges = [(1, 2), (0, 3)];
        assert_eq!(order_columns(&layer, &edges), vec![vec![0, 1], vec![3, 2]]);
    }

    #[test]
    fn loss_csv_rows_parse_and_malformed_ones_are_skipped() {
        let text =
            "step,loss,lr\n1,0.5,1e-5\n2,oops,1e-5\n\n3,0.25,1e-5\n4,NaN,1e-5\n5\n6,0.125,1e-5\n";
        let curve = parse_loss_csv(text).unwrap();
        assert_eq!(curve.points, vec![(1.0, 0.5), (3.0, 0.25), (6.0, 0.125)]);
        assert_eq!(curve.skipped_lines, vec![3, 6, 7]);
        for (bad, why) in [
            ("", "header"),
            ("loss,step\n1,2\n", "header"),
            ("step,loss,lr\n", "no loss values"),
            ("step,loss,lr\nx,y,z\n", "no loss values"),
        ] {
            let err = parse_loss_csv(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_average_window_is_a_twentieth_of_the_run_within_bounds() {
        for (n, want) in [(0, 1), (1, 1), (3, 3), (30, 5), (400, 20), (5000, 100)] {
            assert_eq!(average_window(n), want, "{n} steps");
        }
    }

    #[test]
    fn moving_average_trails_over_its_window() {
        let avg = moving_average(&[1.0, 3.0, 5.0, 7.0], 2);
        assert_eq!(avg, vec![1.0, 2.0, 4.0, 6.0]);
        assert_eq!(moving_average(&[2.0, 4.0], 1), vec![2.0, 4.0]);
    }

    #[test]
    fn the_loss_plot_has_both_lines_and_labelled_ranges() {
        let curve = parse_loss_csv("step,loss,lr\n1,0.5,0\n2,0.3,0\n3,0.25,0\n").unwrap();
        let svg = loss_svg(&curve);
        assert_eq!(svg.matches("<polyline").count(), 2);
        for label in [">0.5000<", ">0.2500<", ">1<", ">3<", ">loss<", ">step<"] {
            assert!(svg.contains(label), "{label} in {svg}");
        }
        // A single point (or a flat loss) still draws inside the plot.
        let flat = loss_svg(&parse_loss_csv("step,loss\n7,0.1\n").unwrap());
        assert!(!flat.contains("NaN") && !flat.contains("inf"), "{flat}");
    }

    const SAMPLE_QUALITY: &str = r#"{
        "lora": "eye<size>", "weights": [-1, 0, 1], "seeds": [1, 2], "box_margin": 2,
        "prompts": [
            {"prompt": "front & <center>", "spearman": 0.97, "mean_eye_size": [1, 2, 3],
             "outside_change": 3.5, "inside_change": 10.0, "outside_inside_ratio": 0.35},
            {"prompt": "side", "spearman": 0.5, "mean_eye_size": [1, 1, 2],
             "outside_change": 4.0, "inside_change": null, "outside_inside_ratio": null}
        ],
        "pooled": {"spearman": null, "mean_eye_size": [1, 1.5, 2.5],
                   "outside_change": 3.75, "inside_change": 10.0, "outside_inside_ratio": 0.375},
        "samples": []
    }"#;

    #[test]
    fn the_quality_table_has_a_row_per_prompt_and_the_pooled_figures_against_the_goal() {
        let q: QualityFile = serde_json::from_str(SAMPLE_QUALITY).unwrap();
        let html = quality_table("quality_<x>", &q);
        let rows: Vec<&str> = html.lines().filter(|l| l.starts_with("<tr><td>")).collect();
        assert_eq!(
            rows,
            vec![
                "<tr><td>front &amp; &lt;center&gt;</td><td class=\"num\">0.970</td><td>met</td>\
                 <td class=\"num\">0.350</td><td class=\"num\">3.50</td><td class=\"num\">10.00</td></tr>",
                "<tr><td>side</td><td class=\"num\">0.500</td><td>not met</td>\
                 <td class=\"num\">n/a</td><td class=\"num\">4.00</td><td class=\"num\">n/a</td></tr>",
                "<tr><td><b>all prompts (pooled)</b></td><td class=\"num\">n/a</td><td>n/a</td>\
                 <td class=\"num\">0.375</td><td class=\"num\">3.75</td><td class=\"num\">10.00</td></tr>",
            ]
        );
        assert!(html.contains("quality_&lt;x&gt;") && html.contains("eye&lt;size&gt;"));
        assert!(html.contains("2 seeds x 3 weights"));
        assert!(html.contains("goal &ge; 0.95"));
    }

    #[test]
    fn published_files_are_linked_relative_to_the_report() {
        let cases = [
            ("/p/recipes", "/p/recipes/out/a.png", "out/a.png"),
            ("/p/recipes", "/p/out/a.png", "../out/a.png"),
            ("/p/recipes", "/p/recipes/../x/./a.png", "../x/a.png"),
            ("/p/recipes", "/q/a.png", "../../q/a.png"),
            ("/p/recipes", "rel/a.png", "rel/a.png"),
        ];
        for (from, to, want) in cases {
            assert_eq!(
                relative_path(Path::new(from), Path::new(to)),
                Path::new(want),
                "{from} -> {to}"
            );
        }
        assert_eq!(
            url_path(Path::new("out/my grid#1%.png")),
            "out/my%20grid%231%25.png"
        );
    }

    #[test]
    fn png_size_reads_the_header_and_rejects_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("a.png");
        image::RgbImage::new(7, 3).save(&png).unwrap();
        assert_eq!(png_size(&png), Some((7, 3)));
        let other = dir.path().join("b.png");
        std::fs::write(&other, b"not a png at all, but long enough").unwrap();
        assert_eq!(png_size(&other), None);
        assert_eq!(png_size(&dir.path().join("missing.png")), None);
    }
}

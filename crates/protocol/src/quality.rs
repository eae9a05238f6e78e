//! The quality file an `evaluate` node writes (`quality.json`), as its readers see it: the
//! figures, the goal the method sets, and the one-line summary a run prints. The writer is
//! `slider-evaluate`'s `QualityReport`; a test there reads its output back through this type.

use serde::Deserialize;

/// The goal the method sets for a slider: measured eye size rises with the weight almost
/// monotonically (Spearman's rank correlation, pooled over prompts and seeds).
pub const SPEARMAN_GOAL: f64 = 0.95;

/// `quality.json`: the fields its readers use.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct QualityFile {
    /// The slider's name.
    pub lora: String,
    #[serde(default)]
    pub weights: Vec<f64>,
    #[serde(default)]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub prompts: Vec<PromptFigures>,
    pub pooled: Figures,
}

/// One prompt's figures.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PromptFigures {
    pub prompt: String,
    #[serde(flatten)]
    pub figures: Figures,
}

/// The figures of one prompt, or of all pooled. `None` where a figure is undefined (a
/// constant side of the correlation, no change inside the eyes).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Figures {
    pub spearman: Option<f64>,
    #[serde(default)]
    pub outside_change: Option<f64>,
    #[serde(default)]
    pub inside_change: Option<f64>,
    pub outside_inside_ratio: Option<f64>,
}

impl Figures {
    /// Whether the Spearman goal is met: `met`, `not met`, or `n/a`.
    pub fn goal(&self) -> &'static str {
        match self.spearman {
            Some(s) if s >= SPEARMAN_GOAL => "met",
            Some(_) => "not met",
            None => "n/a",
        }
    }
}

/// A figure with `digits` decimals, or `n/a`.
pub fn figure(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"))
}

impl QualityFile {
    /// The file's figures, or `None` when `bytes` are not a quality file.
    pub fn parse(bytes: &[u8]) -> Option<QualityFile> {
        serde_json::from_slice(bytes).ok()
    }

    /// The line a run prints for the file.
    pub fn summary_line(&self) -> String {
        format!(
            "slider quality of `{}`: Spearman(eye size, weight) {} (goal >= {SPEARMAN_GOAL}), \
             change outside/inside the eyes {}",
            self.lora,
            figure(self.pooled.spearman, 3),
            figure(self.pooled.outside_inside_ratio, 3),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quality_file_gets_one_summary_line_and_other_json_none() {
        let cases: [(&str, Option<&str>); 3] = [
            (
                r#"{"lora": "eyesize", "pooled": {"spearman": 0.96123, "outside_inside_ratio": 0.1}}"#,
                Some(
                    "slider quality of `eyesize`: Spearman(eye size, weight) 0.961 (goal >= 0.95), change outside/inside the eyes 0.100",
                ),
            ),
            (
                r#"{"lora": "flat", "pooled": {"spearman": null, "outside_inside_ratio": null}}"#,
                Some(
                    "slider quality of `flat`: Spearman(eye size, weight) n/a (goal >= 0.95), change outside/inside the eyes n/a",
                ),
            ),
            (r#"{"lora": "x"}"#, None),
        ];
        for (content, want) in cases {
            let line = QualityFile::parse(content.as_bytes()).map(|q| q.summary_line());
            assert_eq!(line.as_deref(), want, "{content}");
        }
    }

    #[test]
    fn the_goal_is_met_at_and_above_the_figure() {
        let at = |spearman| Figures {
            spearman,
            outside_change: None,
            inside_change: None,
            outside_inside_ratio: None,
        };
        assert_eq!(at(Some(SPEARMAN_GOAL)).goal(), "met");
        assert_eq!(at(Some(0.9)).goal(), "not met");
        assert_eq!(at(None).goal(), "n/a");
    }
}

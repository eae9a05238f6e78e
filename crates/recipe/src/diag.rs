//! Errors: `Diag` is what validation collects (spans into any of the recipe's sources), and
//! `RecipeError`/`Problem` are what callers get: miette diagnostics with the source text,
//! labelled spans, a help line, and every independent problem at once.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode};
use thiserror::Error;

/// Index into [`Sources`]: 0 is the recipe file, then one per `--set` string.
pub(crate) type SourceId = usize;

/// A byte range in one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Span {
    pub src: SourceId,
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(src: SourceId, start: usize, end: usize) -> Self {
        Span { src, start, end }
    }

    /// From the start of `self` to the end of `other` (same source).
    pub fn to(self, other: Span) -> Span {
        if other.src != self.src {
            return self;
        }
        Span::new(self.src, self.start, other.end.max(self.start))
    }
}

/// One problem found in a recipe, before it is attached to its source text.
#[derive(Debug, Clone)]
pub(crate) struct Diag {
    pub code: &'static str,
    pub message: String,
    pub labels: Vec<(Span, String)>,
    pub help: Option<String>,
}

impl Diag {
    pub fn new(
        code: &'static str,
        message: impl Into<String>,
        span: Span,
        label: impl Into<String>,
    ) -> Self {
        Diag {
            code,
            message: message.into(),
            labels: vec![(span, label.into())],
            help: None,
        }
    }

    pub fn with_label(mut self, span: Span, label: impl Into<String>) -> Self {
        self.labels.push((span, label.into()));
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    fn primary(&self) -> Span {
        self.labels[0].0
    }
}

/// The texts errors can point into: the recipe and each `--set` override.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    items: Vec<(String, Arc<String>)>,
    /// Byte offset of each line's start, per source (for line:column without rescanning).
    line_starts: Vec<Vec<usize>>,
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

impl Sources {
    pub fn new(recipe_name: String, text: &str) -> Self {
        Sources {
            items: vec![(recipe_name, Arc::new(text.to_owned()))],
            line_starts: vec![line_starts(text)],
        }
    }

    pub fn add(&mut self, name: String, text: &str) -> SourceId {
        self.items.push((name, Arc::new(text.to_owned())));
        self.line_starts.push(line_starts(text));
        self.items.len() - 1
    }

    pub fn text(&self, id: SourceId) -> &str {
        &self.items[id].1
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, span: Span) -> (usize, usize) {
        let text = self.text(span.src);
        let at = span.start.min(text.len());
        let starts = &self.line_starts[span.src];
        let line = starts.partition_point(|&s| s <= at).max(1);
        let col = text
            .get(starts[line - 1]..at)
            .map_or(0, |l| l.chars().count())
            + 1;
        (line, col)
    }

    fn problem(&self, d: Diag) -> Problem {
        let primary = d.primary();
        let (name, text) = &self.items[primary.src];
        let (line, column) = self.line_col(primary);
        let labels = d
            .labels
            .iter()
            .enumerate()
            .filter(|(_, (s, _))| s.src == primary.src)
            .map(|(i, (s, l))| {
                let span = (s.start, s.end - s.start);
                if i == 0 {
                    LabeledSpan::new_primary_with_span(Some(l.clone()), span)
                } else {
                    LabeledSpan::new_with_span(Some(l.clone()), span)
                }
            })
            .collect();
        Problem {
            code: d.code,
            message: d.message,
            help: d.help,
            labels,
            text: NamedSource::new(name, Arc::clone(text)),
            location: Location {
                file: name.clone(),
                line,
                column,
            },
        }
    }

    /// Turns collected diagnostics into the error callers see (one, or several as `related`).
    pub fn error(&self, mut diags: Vec<Diag>) -> RecipeError {
        // The same template error repeats once per matrix expansion: report it once.
        let mut seen = std::collections::HashSet::new();
        diags.retain(|d| seen.insert((d.primary(), d.message.clone())));
        let mut problems: Vec<Problem> = diags.into_iter().map(|d| self.problem(d)).collect();
        if problems.len() == 1 {
            return RecipeError::Invalid(Box::new(problems.remove(0)));
        }
        RecipeError::Many {
            file: self.items[0].0.clone(),
            problems,
        }
    }
}

/// File, line and column (1-based) of a problem's main span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The recipe file as it was named, or `--set` for an override.
    pub file: String,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// One problem in a recipe: a message, the source text with labelled spans, and a help line.
#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct Problem {
    code: &'static str,
    message: String,
    help: Option<String>,
    labels: Vec<LabeledSpan>,
    text: NamedSource<Arc<String>>,
    location: Location,
}

impl Problem {
    /// A stable identifier of the kind of problem, e.g. `recipe::unknown_key`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message without location, e.g. "unknown key `new_rnak`".
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    pub fn help_text(&self) -> Option<&str> {
        self.help.as_deref()
    }
}

impl Diagnostic for Problem {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.code))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(&self.text)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        Some(Box::new(self.labels.iter().cloned()))
    }
}

/// Why a recipe could not be loaded.
#[derive(Debug, Error)]
pub enum RecipeError {
    #[error("cannot read the recipe `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Exactly one problem.
    #[error(transparent)]
    Invalid(Box<Problem>),
    /// Several independent problems, each rendered in full.
    #[error("{file}: {} problems", problems.len())]
    Many {
        file: String,
        problems: Vec<Problem>,
    },
}

impl Diagnostic for RecipeError {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            RecipeError::Read { .. } => Some(Box::new("recipe::read")),
            RecipeError::Invalid(p) => Diagnostic::code(p.as_ref()),
            RecipeError::Many { .. } => Some(Box::new("recipe::invalid")),
        }
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        match self {
            RecipeError::Read { .. } => None,
            RecipeError::Invalid(p) => p.help(),
            RecipeError::Many { .. } => Some(Box::new(
                "nothing was run; fix the problems below and try again",
            )),
        }
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        match self {
            RecipeError::Invalid(p) => p.source_code(),
            _ => None,
        }
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        match self {
            RecipeError::Invalid(p) => p.labels(),
            _ => None,
        }
    }

    fn related<'a>(&'a self) -> Option<Box<dyn Iterator<Item = &'a dyn Diagnostic> + 'a>> {
        match self {
            RecipeError::Many { problems, .. } => {
                Some(Box::new(problems.iter().map(|p| p as &dyn Diagnostic)))
            }
            _ => None,
        }
    }
}

impl RecipeError {
    /// Every problem found (empty for [`RecipeError::Read`]).
    pub fn problems(&self) -> Vec<&Problem> {
        match self {
            RecipeError::Read { .. } => Vec::new(),
            RecipeError::Invalid(p) => vec![p],
            RecipeError::Many { problems, .. } => problems.iter().collect(),
        }
    }
}

/// "did you mean `x`?" for the closest candidate, if any is close enough.
pub(crate) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    closest(word, candidates).map(|c| format!("did you mean `{c}`?"))
}

pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&lower, &c.to_lowercase()), c))
        .filter(|(score, c)| {
            *score >= 0.85 || strsim::levenshtein(&lower, &c.to_lowercase()) <= 2.min(c.len() / 3)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_closest_name_or_none() {
        let keys = ["new_rank", "new_conv_rank", "models", "ratios"];
        let cases = [
            ("new_rnak", Some("new_rank")),
            ("rank", None),
            ("ratio", Some("ratios")),
            ("Models", Some("models")),
            ("zzz", None),
        ];
        for (word, expected) in cases {
            assert_eq!(closest(word, keys), expected, "{word}");
        }
    }

    #[test]
    fn line_and_column_are_one_based() {
        let s = Sources::new("r.yaml".into(), "ab\ncd é\nx");
        assert_eq!(s.line_col(Span::new(0, 0, 1)), (1, 1));
        assert_eq!(s.line_col(Span::new(0, 4, 5)), (2, 2));
        assert_eq!(s.line_col(Span::new(0, 9, 10)), (3, 1));
    }
}

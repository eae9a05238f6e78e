//! A seeded mutation campaign over the shipped recipes: lines deleted, duplicated, swapped and
//! re-indented; values replaced by hostile YAML (NaN, huge numbers, aliases, tags, nested
//! lists, empty maps); keys replaced by other kinds' keys or garbage; node references rewired
//! (cycles included); text cut at random points; random punctuation inserted; `--set`
//! overrides that are malformed. Each mutant goes through [`slider_recipe::load_str`]: it
//! must compile or be refused with a rendered message that points at a line and column when
//! it names a place, and it must never panic.
//!
//! `SLIDER_RECIPE_MUTANTS` (default 1500) and `SLIDER_RECIPE_SEED` (default 11) set the
//! campaign's size and seed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use miette::{GraphicalReportHandler, GraphicalTheme};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const HOSTILE_VALUES: &[&str] = &[
    "-1",
    "0",
    "-0.0",
    "1e999",
    "-1e999",
    ".nan",
    ".inf",
    "nan",
    "18446744073709551616",
    "99999999999999999999999999",
    "0.000000000000000000000000001",
    "[]",
    "{}",
    "~",
    "''",
    "\"\"",
    "true",
    "[1, [2, [3]]]",
    "{a: {b: c}}",
    "*nowhere",
    "&anchor 3",
    "!!binary aGVsbG8=",
    "!custom 3",
    "\"${missing}\"",
    "${angle}${angle}",
    "\"\\u0000\"",
    "../../../../etc/passwd",
    "/dev/null",
    "[big, small, big, small, big]",
    "[1.5, -1.5, 2.0]",
];

const KEYS: &[&str] = &[
    "kind",
    "models",
    "model",
    "ratios",
    "new_rank",
    "base",
    "images",
    "caption",
    "seed",
    "max_train_steps",
    "resolution",
    "network_dim",
    "network_alpha",
    "learning_rate",
    "optimizer_type",
    "lr_scheduler",
    "sampler",
    "steps",
    "weights",
    "x",
    "y",
    "matrix",
    "vars",
    "outputs",
    "defaults",
    "nodes",
    "<<",
    "",
    "kind kind",
    "\u{1F600}",
];

const PUNCTUATION: &[&str] = &[
    ":", "-", "[", "]", "{", "}", "#", "&", "*", "!", "|", ">", "%", "@", "`", "\t", "\"", "'",
    ",", "?", "\n", "  ", "${", "}}",
];

const OVERRIDES: &[&str] = &[
    "train.max_train_steps=abc",
    "train.max_train_steps=-3",
    "nodes.nowhere.seed=1",
    "=",
    "a.b.c.d=[",
    "train=3",
    "vars.loras=",
    "nodes.slider.models=[slider]",
    "nodes.eyesize.model=eyesize",
    "xy_plot.y={seed: []}",
    "matrix.angle=[]",
    "resize.new_rank=1e99",
    "svd_merge.ratios=[.nan]",
];

fn mutate(text: &str, rng: &mut ChaCha8Rng) -> (String, Vec<String>) {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut overrides = Vec::new();
    let rounds = rng.random_range(1..4);
    for _ in 0..rounds {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let i = rng.random_range(0..lines.len());
        match rng.random_range(0..11) {
            0 => {
                lines.remove(i);
            }
            1 => {
                let line = lines[i].clone();
                lines.insert(i, line);
            }
            2 => {
                let j = rng.random_range(0..lines.len());
                lines.swap(i, j);
            }
            3 => {
                if rng.random_bool(0.5) {
                    lines[i].insert_str(0, [" ", "  ", "\t"].choose(rng).unwrap_or(&" "));
                } else {
                    let trimmed = lines[i].trim_start().to_owned();
                    let indent = lines[i].len() - trimmed.len();
                    lines[i] = format!("{}{trimmed}", " ".repeat(indent.saturating_sub(2)));
                }
            }
            4 | 5 => {
                if let Some(colon) = lines[i].find(": ") {
                    let value = HOSTILE_VALUES.choose(rng).unwrap_or(&"0");
                    lines[i] = format!("{}: {value}", &lines[i][..colon]);
                }
            }
            6 => {
                if let Some(colon) = lines[i].find(':') {
                    let indent = lines[i].len() - lines[i].trim_start().len();
                    let key = KEYS.choose(rng).unwrap_or(&"kind");
                    lines[i] = format!("{}{key}{}", " ".repeat(indent), &lines[i][colon..]);
                }
            }
            7 => {
                // Rewire a reference: a list item or value names another node (or itself).
                let names: Vec<String> = lines
                    .iter()
                    .filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.ends_with(':'))
                    .map(|l| l.trim().trim_end_matches(':').to_owned())
                    .collect();
                if let (Some(name), Some(colon)) = (names.choose(rng), lines[i].find(": ")) {
                    lines[i] = format!("{}: {name}", &lines[i][..colon]);
                }
            }
            8 => {
                let joined = lines.join("\n");
                let mut cut = rng.random_range(0..=joined.len());
                while !joined.is_char_boundary(cut) {
                    cut -= 1;
                }
                lines = joined[..cut].lines().map(str::to_owned).collect();
            }
            9 => {
                let mut at = rng.random_range(0..=lines[i].len());
                while !lines[i].is_char_boundary(at) {
                    at -= 1;
                }
                let p = PUNCTUATION.choose(rng).unwrap_or(&":");
                lines[i].insert_str(at, p);
            }
            _ => overrides.push(OVERRIDES.choose(rng).unwrap_or(&"=").to_string()),
        }
    }
    (lines.join("\n"), overrides)
}

fn render(error: &dyn miette::Diagnostic) -> String {
    let mut out = String::new();
    GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor())
        .render_report(&mut out, error)
        .expect("a report renders");
    out
}

#[test]
fn mutated_recipes_compile_or_are_refused_with_a_message_never_a_panic() {
    let mutants: usize = std::env::var("SLIDER_RECIPE_MUTANTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let seed: u64 = std::env::var("SLIDER_RECIPE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(11);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let originals: Vec<(PathBuf, String)> =
        ["eyesize.yaml", "eyesize-sdxl.yaml", "merge-only.yaml"]
            .iter()
            .map(|name| {
                let path = repo.join("recipes").join(name);
                let text = std::fs::read_to_string(&path).expect("a shipped recipe");
                (path, text)
            })
            .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut refused, mut accepted) = (0usize, 0usize);
    let mut panics = Vec::new();
    let mut silent = Vec::new();
    for case in 0..mutants {
        let (path, original) = &originals[case % originals.len()];
        let (text, overrides) = mutate(original, &mut rng);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            slider_recipe::load_str(&text, path, &overrides).map_err(|e| render(&e))
        }));
        match outcome {
            Err(_) => panics.push(format!("case {case}: {overrides:?}\n{text}")),
            Ok(Ok(_)) => accepted += 1,
            Ok(Err(message)) => {
                refused += 1;
                if message.trim().is_empty() {
                    silent.push(format!("case {case}: empty message\n{text}"));
                }
            }
        }
    }
    eprintln!(
        "{mutants} mutated recipes (seed {seed}): {refused} refused with a message, {accepted} \
         still valid, {} panics",
        panics.len()
    );
    assert!(panics.is_empty(), "panics:\n{}", panics.join("\n---\n"));
    assert!(silent.is_empty(), "{}", silent.join("\n---\n"));
    assert!(
        refused > mutants / 2,
        "the mutations should mostly break the recipes: {refused} of {mutants} refused"
    );
}

//! `docs/recipes.md` documents every key the schema accepts: each kind has a section whose
//! table lists each of its parameters, and every top-level key and accepted value is named.

use slider_recipe::{KINDS, LrScheduler, MixedPrecision, Optimizer, Sampler, TOP_KEYS, Trainer};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/recipes.md");
    std::fs::read_to_string(path).expect("docs/recipes.md")
}

/// The text of the `### \`kind\`` section.
fn section<'d>(doc: &'d str, kind: &str) -> &'d str {
    let head = format!("### `{kind}`");
    let start = doc
        .find(&head)
        .unwrap_or_else(|| panic!("no section {head}"));
    let rest = &doc[start + head.len()..];
    let end = rest
        .find("\n### ")
        .or_else(|| rest.find("\n## "))
        .unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn every_parameter_of_every_kind_is_in_its_section() {
    let doc = doc();
    for kind in KINDS {
        let s = section(&doc, kind);
        for p in slider_recipe::param_names(kind) {
            assert!(
                s.contains(&format!("`{p}`")),
                "docs/recipes.md: `{kind}` section lacks `{p}`"
            );
        }
    }
}

#[test]
fn every_top_level_key_and_accepted_value_is_named() {
    let doc = doc();
    let names = TOP_KEYS
        .iter()
        .copied()
        .chain(LrScheduler::names())
        .chain(Optimizer::names())
        .chain(MixedPrecision::names())
        .chain(Sampler::names())
        .chain(Trainer::names());
    for name in names {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/recipes.md lacks `{name}`"
        );
    }
}

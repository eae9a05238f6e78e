//! The typed plan a recipe compiles to: plain data, the API boundary between `slider-recipe`
//! and `slider-engine`. Names and paths here are for people and publishing; the engine keys
//! nodes by content only.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use petgraph::graph::DiGraph;

pub use slider_protocol::params::*;

/// A validated recipe: every reference resolved, every file checked to exist, no cycles.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The recipe file, absolute.
    pub recipe_path: PathBuf,
    /// Directory relative paths in the recipe are resolved against (the recipe's directory).
    pub root: PathBuf,
    /// Nodes after matrix expansion, in a topological order (inputs before consumers).
    pub nodes: Vec<Node>,
    /// Edges point from an input node to the node that consumes it. Node weights are
    /// indices into `nodes`.
    pub graph: DiGraph<usize, ()>,
    /// Where finished outputs are published: node name -> absolute path.
    pub outputs: BTreeMap<String, PathBuf>,
}

impl Plan {
    /// Each node's position in `nodes`, by name.
    pub fn index_by_name(&self) -> HashMap<&str, usize> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect()
    }
}

/// One node of the plan.
#[derive(Debug, Clone)]
pub struct Node {
    /// Name after matrix expansion, e.g. `small_front`.
    pub name: String,
    /// Typed parameters; every kohya default filled in.
    pub params: NodeParams,
    /// Where the node was written in the recipe (for errors raised later, e.g. by executors).
    pub origin: Origin,
}

/// File, line and column (1-based) of a node's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

/// Replaces `{name}` placeholders in one `command` argument with `lookup(name)`.
/// `{{` and `}}` are literal braces; a `{` not followed by `name}` (letters, digits, `_`) is
/// kept as is, so JSON arguments pass through. Returns the unknown name on failure.
///
/// ```
/// use slider_recipe::substitute_placeholders;
/// let arg = substitute_placeholders("--out={lora}", |n| (n == "lora").then(|| "/o/l.safetensors".to_string()));
/// assert_eq!(arg.unwrap(), "--out=/o/l.safetensors");
/// assert_eq!(substitute_placeholders("{{x}}", |_| None).unwrap(), "{x}");
/// assert_eq!(substitute_placeholders("{nope}", |_| None).unwrap_err(), "nope");
/// ```
pub fn substitute_placeholders(
    arg: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(arg.len());
    let mut rest = arg;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if let Some(after) = tail.strip_prefix('{') {
            let name_len = after
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            if let (true, Some(next)) = (name_len > 0, after[name_len..].strip_prefix('}')) {
                let name = &after[..name_len];
                out.push_str(&lookup(name).ok_or_else(|| name.to_owned())?);
                rest = next;
                continue;
            }
        }
        out.push_str(&tail[..1]);
        rest = &tail[1..];
    }
    out.push_str(rest);
    Ok(out)
}

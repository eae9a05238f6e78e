//! From recipe text to a [`Plan`]: read the top-level sections, apply `--set` overrides,
//! expand the matrix, decode every node, resolve references, check types and cycles, and
//! order the nodes. Every phase collects all its problems before giving up.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use petgraph::graph::{DiGraph, NodeIndex};

use crate::diag::{Diag, Sources, Span, closest};
use crate::expand::{
    self, Env, Override, VarRef, bindings, collect_refs, set_path, substitute, suggest,
};
use crate::params::{self, Fields, KINDS, KINDS_WITH_BASE, Produces, RefUse, Resolver, Slot};
use crate::plan::{Node, NodeParams, Origin, Plan};
use crate::yaml::{self, Entry, Value, Yaml};

/// The recipe's top-level keys.
pub const TOP_KEYS: [&str; 7] = [
    "base",
    "base_config",
    "vars",
    "defaults",
    "matrix",
    "nodes",
    "outputs",
];

/// Compiles recipe text. `None` means `diags` holds at least one problem.
pub(crate) fn compile(
    text: &str,
    path: &Path,
    overrides: &[String],
    sources: &mut Sources,
    diags: &mut Vec<Diag>,
) -> Option<Plan> {
    let mut sets = Vec::new();
    for o in overrides {
        let id = sources.add("--set".into(), o);
        match expand::parse_override(o, id) {
            Ok(s) => sets.push(s),
            Err(d) => diags.push(d),
        }
    }
    let sources: &Sources = sources;
    let mut top = parse_top(text, diags)?;
    let late = apply_global_overrides(&mut top, sets, diags);

    let recipe_path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let root = recipe_path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let root_display = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.display().to_string(),
        _ => ".".to_owned(),
    };
    let section = |key: &str| top.iter().find(|e| e.key == key);

    let mut env = read_vars(section("vars"), sources, diags);
    let matrix = read_matrix(section("matrix"), &env, diags);
    env.unbound = matrix.iter().map(|(m, _)| m.clone()).collect();
    let defaults = read_defaults(section("defaults"), diags);
    let base = section("base")
        .filter(|e| !matches!(e.value.value, Value::Null))
        .map(|e| substitute(&e.value, &env, sources, diags));
    let base_config = section("base_config")
        .filter(|e| !matches!(e.value.value, Value::Null))
        .map(|e| substitute(&e.value, &env, sources, diags));

    let templates = node_templates(&top, section("nodes"), diags)?;
    let mut expanded = Vec::new();
    for t in &templates {
        expand_template(
            t,
            &Context {
                env: &env,
                matrix: &matrix,
                defaults: &defaults,
                base: base.as_ref(),
                base_config: base_config.as_ref(),
                sources,
            },
            &mut expanded,
            diags,
        );
    }
    reject_collisions(&mut expanded, diags);
    for o in late.nodes {
        apply_node_override(o, &mut expanded, sources, diags);
    }

    let names: Vec<String> = expanded.iter().map(|n| n.name.clone()).collect();
    let resolver = Resolver {
        name_set: names.iter().cloned().collect(),
        names,
        root,
        root_display,
    };
    let mut refs = Vec::new();
    let mut decoded: Vec<Option<NodeParams>> = Vec::new();
    for n in &expanded {
        decoded.push(params::decode(Fields {
            node: &n.name,
            kind: n.kind,
            node_span: n.name_span,
            entries: &n.entries,
            resolver: &resolver,
            diags,
            refs: &mut refs,
        }));
    }
    let outputs = read_outputs(
        section("outputs"),
        late.outputs,
        &env,
        &matrix,
        &resolver,
        sources,
        diags,
    );
    check_types(&expanded, &decoded, &refs, diags);
    check_cycles(&expanded, &refs, diags);
    if !diags.is_empty() {
        return None;
    }

    Some(assemble(
        &expanded,
        decoded,
        &refs,
        recipe_path,
        resolver.root,
        outputs,
        sources,
    ))
}

/// The recipe's top-level mapping, its unknown keys reported.
fn parse_top(text: &str, diags: &mut Vec<Diag>) -> Option<Vec<Entry>> {
    let doc = match yaml::parse(text, 0, 0) {
        Ok(d) => d,
        Err(d) => {
            diags.push(d);
            return None;
        }
    };
    let top = match doc.value {
        Value::Map(entries) => entries,
        Value::Null => {
            diags.push(
                Diag::new(
                    "recipe::empty",
                    "the recipe is empty",
                    doc.span,
                    "nothing here",
                )
                .help("a recipe needs at least `nodes:`; see docs/recipes.md"),
            );
            return None;
        }
        other => {
            diags.push(Diag::new(
                "recipe::wrong_type",
                "a recipe must be a mapping of `base`, `base_config`, `vars`, `defaults`, `matrix`, `nodes`, `outputs`",
                doc.span,
                format!("found {}", other.describe()),
            ));
            return None;
        }
    };
    for e in &top {
        if !TOP_KEYS.contains(&e.key.as_str()) {
            diags.push(unknown_top_key(&e.key, e.key_span));
        }
    }
    Some(top)
}

/// The `nodes` section's entries (one template per node name, before matrix expansion).
fn node_templates(
    top: &[Entry],
    nodes: Option<&Entry>,
    diags: &mut Vec<Diag>,
) -> Option<Vec<Entry>> {
    let Some(nodes_entry) = nodes else {
        let misspelled = top
            .iter()
            .any(|e| e.key != "nodes" && closest(&e.key, TOP_KEYS) == Some("nodes"));
        if misspelled {
            return None;
        }
        diags.push(
            Diag::new(
                "recipe::missing_key",
                "the recipe has no `nodes`",
                Span::new(0, 0, 0),
                "expected `nodes:` somewhere in this file",
            )
            .help("add `nodes:` with at least one node, e.g. `merged: {kind: svd_merge, ...}`"),
        );
        return None;
    };
    let templates = match &nodes_entry.value.value {
        Value::Map(entries) if !entries.is_empty() => entries.clone(),
        other => {
            diags.push(
                Diag::new(
                    "recipe::wrong_type",
                    "`nodes` must be a mapping of node name to node",
                    nodes_entry.value.span,
                    format!("found {}", other.describe()),
                )
                .help("write `nodes:` then one `name: {kind: ..., ...}` per node"),
            );
            return None;
        }
    };

    Some(templates)
}

/// The plan from the checked nodes: in topological order, with the DAG of their references.
fn assemble(
    expanded: &[Expanded],
    decoded: Vec<Option<NodeParams>>,
    refs: &[RefUse],
    recipe_path: PathBuf,
    root: PathBuf,
    outputs: BTreeMap<String, PathBuf>,
    sources: &Sources,
) -> Plan {
    let nodes: Vec<(usize, NodeParams)> = decoded
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| (i, p)))
        .collect();
    let order = topological_order(expanded, refs);
    let mut position = HashMap::new();
    let mut plan_nodes = Vec::with_capacity(nodes.len());
    let mut by_index: HashMap<usize, NodeParams> = nodes.into_iter().collect();
    for i in order {
        let Some(params) = by_index.remove(&i) else {
            continue;
        };
        let n = &expanded[i];
        let (line, column) = sources.line_col(n.name_span);
        position.insert(n.name.clone(), plan_nodes.len());
        plan_nodes.push(Node {
            name: n.name.clone(),
            params,
            origin: Origin {
                file: recipe_path.clone(),
                line,
                column,
            },
        });
    }
    let mut graph = DiGraph::with_capacity(plan_nodes.len(), refs.len());
    for i in 0..plan_nodes.len() {
        graph.add_node(i);
    }
    let mut edges = BTreeSet::new();
    for r in refs {
        if let (Some(&from), Some(&to)) = (position.get(&r.to), position.get(&r.from)) {
            edges.insert((from, to));
        }
    }
    for (from, to) in edges {
        graph.add_edge(NodeIndex::new(from), NodeIndex::new(to), ());
    }
    Plan {
        root,
        recipe_path,
        nodes: plan_nodes,
        graph,
        outputs,
    }
}

fn unknown_top_key(key: &str, span: Span) -> Diag {
    let help = if KINDS.contains(&key) {
        format!("node defaults go under `defaults:`, e.g. `defaults: {{{key}: {{...}}}}`")
    } else {
        match closest(key, TOP_KEYS) {
            Some(c) => format!("did you mean `{c}`?"),
            None => format!("remove this key; a recipe has: {}", TOP_KEYS.join(", ")),
        }
    };
    Diag::new(
        "recipe::unknown_key",
        format!("unknown key `{key}`"),
        span,
        "not a recipe section",
    )
    .help(help)
}

/// `KEY` is not a parameter of `kind`: suggest a close name, or the kind that has it.
pub(crate) fn unknown_param(kind: &str, key: &str, span: Span) -> Diag {
    let names = params::param_names(kind);
    let help = match closest(key, names.iter().copied()) {
        Some(c) => format!("did you mean `{c}`?"),
        None => match KINDS.iter().find(|k| params::param_names(k).contains(&key)) {
            Some(other) => format!(
                "`{key}` is a parameter of `{other}` nodes; remove it from this `{kind}` node"
            ),
            None => format!("remove this key; `{kind}` takes: {}", names.join(", ")),
        },
    };
    Diag::new(
        "recipe::unknown_key",
        format!("unknown `{kind}` parameter `{key}`"),
        span,
        "unknown key",
    )
    .help(help)
}

/// Overrides that can only be applied after expansion.
#[derive(Default)]
struct LateOverrides {
    nodes: Vec<Override>,
    outputs: Vec<Override>,
}

fn section_map<'a>(top: &'a [Entry], key: &str) -> Option<&'a [Entry]> {
    top.iter()
        .find(|e| e.key == key)
        .and_then(|e| e.value.as_map())
}

fn apply_global_overrides(
    top: &mut Vec<Entry>,
    sets: Vec<Override>,
    diags: &mut Vec<Diag>,
) -> LateOverrides {
    let mut late = LateOverrides::default();
    for mut o in sets {
        let (head, head_span) = o.path[0].clone();
        let whole = head_span.to(o.path.last().map_or(head_span, |p| p.1));
        let shape_error = |expected: &str| {
            Diag::new(
                "recipe::bad_set",
                format!("`--set {head}...` expects `{expected}`"),
                whole,
                "wrong number of parts",
            )
        };
        match head.as_str() {
            "base" | "base_config" if o.path.len() == 1 => {
                let value = o.value;
                if let Err(d) = set_path(top, &o.path, value) {
                    diags.push(d);
                }
            }
            "vars" | "matrix" => {
                if o.path.len() != 2 {
                    diags.push(shape_error(&format!("{head}.NAME=VALUE")));
                    continue;
                }
                let (name, span) = &o.path[1];
                let declared: Vec<&str> = section_map(top, &head)
                    .map(|m| m.iter().map(|e| e.key.as_str()).collect())
                    .unwrap_or_default();
                if !declared.contains(&name.as_str()) {
                    let what = if head == "vars" {
                        "variables"
                    } else {
                        "matrix variables"
                    };
                    diags.push(
                        Diag::new(
                            "recipe::bad_set",
                            format!("the recipe has no {head} entry `{name}`"),
                            *span,
                            "not declared in the recipe",
                        )
                        .help(suggest(
                            name,
                            &format!("declared {what}"),
                            &declared,
                        )),
                    );
                    continue;
                }
                if let Err(d) = set_path(top, &o.path, o.value) {
                    diags.push(d);
                }
            }
            "defaults" | "train" | "svd_merge" | "merge" | "resize" | "merge_into_model"
            | "xy_plot" | "evaluate" | "command" => {
                if head != "defaults" {
                    o.path.insert(0, ("defaults".to_owned(), head_span));
                }
                if o.path.len() < 3 {
                    diags.push(shape_error("KIND.KEY=VALUE"));
                    continue;
                }
                let (kind, kind_span) = &o.path[1];
                if !KINDS.contains(&kind.as_str()) {
                    diags.push(unknown_kind(kind, *kind_span));
                    continue;
                }
                if let Err(d) = set_path(top, &o.path, o.value) {
                    diags.push(d);
                }
            }
            "nodes" => {
                if o.path.len() < 3 {
                    diags.push(shape_error("nodes.NAME.KEY=VALUE"));
                } else {
                    late.nodes.push(o);
                }
            }
            "outputs" => {
                if o.path.len() != 2 {
                    diags.push(shape_error("outputs.NODE=PATH"));
                } else {
                    late.outputs.push(o);
                }
            }
            _ => {
                let mut targets: Vec<&str> = TOP_KEYS.to_vec();
                targets.extend(KINDS);
                diags.push(
                    Diag::new(
                        "recipe::bad_set",
                        format!("`--set` cannot change `{head}`"),
                        head_span,
                        "unknown",
                    )
                    .help(match closest(&head, targets.iter().copied()) {
                        Some(c) => format!("did you mean `{c}`?"),
                        None => "write `KIND.KEY=VALUE` (e.g. `train.max_train_steps=10`), \
                                 `nodes.NAME.KEY=VALUE`, `vars.NAME=VALUE`, `matrix.NAME=[...]`, \
                                 `base=PATH` or `outputs.NODE=PATH`"
                            .to_owned(),
                    }),
                );
            }
        }
    }
    late
}

fn unknown_kind(kind: &str, span: Span) -> Diag {
    Diag::new(
        "recipe::unknown_kind",
        format!("unknown node kind `{kind}`"),
        span,
        "not a node kind",
    )
    .help(suggest(kind, "kinds", &KINDS))
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `vars`: each value may use the variables declared before it.
fn read_vars(section: Option<&Entry>, sources: &Sources, diags: &mut Vec<Diag>) -> Env {
    let mut env = Env::default();
    let Some(e) = section else { return env };
    let Some(entries) = e.value.as_map() else {
        if !matches!(e.value.value, Value::Null) {
            diags.push(mapping_expected("vars", &e.value, "`vars: {root: /data}`"));
        }
        return env;
    };
    for v in entries {
        if !is_name(&v.key) || v.key.contains('-') {
            diags.push(bad_name(&v.key, v.key_span, "variable"));
            continue;
        }
        let value = substitute(&v.value, &env, sources, diags);
        env.values.push((v.key.clone(), value));
    }
    env
}

fn read_matrix(
    section: Option<&Entry>,
    env: &Env,
    diags: &mut Vec<Diag>,
) -> Vec<(String, Vec<Yaml>)> {
    let mut out = Vec::new();
    let Some(e) = section else { return out };
    let Some(entries) = e.value.as_map() else {
        if !matches!(e.value.value, Value::Null) {
            diags.push(mapping_expected(
                "matrix",
                &e.value,
                "`matrix: {angle: [front, 45deg, side]}`",
            ));
        }
        return out;
    };
    for m in entries {
        if !is_name(&m.key) || m.key.contains('-') {
            diags.push(bad_name(&m.key, m.key_span, "matrix variable"));
            continue;
        }
        if env.get(&m.key).is_some() {
            diags.push(
                Diag::new(
                    "recipe::duplicate_key",
                    format!("`{}` is both a var and a matrix variable", m.key),
                    m.key_span,
                    "also declared under `vars`",
                )
                .help("rename one of them"),
            );
            continue;
        }
        match &m.value.value {
            Value::Seq(items)
                if !items.is_empty() && items.iter().all(|i| i.value.scalar_text().is_some()) =>
            {
                out.push((m.key.clone(), items.clone()));
            }
            Value::Seq(items) if items.is_empty() => diags.push(
                Diag::new(
                    "recipe::bad_value",
                    format!("matrix variable `{}` has no values", m.key),
                    m.value.span,
                    "empty list",
                )
                .help("list at least one value"),
            ),
            other => diags.push(
                Diag::new(
                    "recipe::wrong_type",
                    format!("matrix variable `{}` must be a list of plain values", m.key),
                    m.value.span,
                    format!("found {}", other.describe()),
                )
                .help("e.g. `angle: [front, 45deg, side]`"),
            ),
        }
    }
    out
}

fn read_defaults(
    section: Option<&Entry>,
    diags: &mut Vec<Diag>,
) -> BTreeMap<&'static str, Vec<Entry>> {
    let mut out = BTreeMap::new();
    let Some(e) = section else { return out };
    let Some(entries) = e.value.as_map() else {
        if !matches!(e.value.value, Value::Null) {
            diags.push(mapping_expected(
                "defaults",
                &e.value,
                "`defaults: {train: {max_train_steps: 400}}`",
            ));
        }
        return out;
    };
    for d in entries {
        let Some(kind) = KINDS.iter().find(|k| **k == d.key) else {
            diags.push(unknown_kind(&d.key, d.key_span));
            continue;
        };
        let Some(params) = d.value.as_map() else {
            diags.push(mapping_expected(kind, &d.value, "`max_train_steps: 400`"));
            continue;
        };
        let mut kept = Vec::new();
        for p in params {
            if params::param_names(kind).contains(&p.key.as_str()) {
                kept.push(p.clone());
            } else {
                diags.push(unknown_param(kind, &p.key, p.key_span));
            }
        }
        out.insert(*kind, kept);
    }
    out
}

fn mapping_expected(what: &str, y: &Yaml, example: &str) -> Diag {
    Diag::new(
        "recipe::wrong_type",
        format!("`{what}` must be a mapping"),
        y.span,
        format!("found {}", y.value.describe()),
    )
    .help(format!("e.g. {example}"))
}

fn bad_name(name: &str, span: Span, what: &str) -> Diag {
    Diag::new(
        "recipe::bad_name",
        format!("`{name}` is not a valid {what} name"),
        span,
        "invalid name",
    )
    .help(if what == "node" {
        "use letters, digits, `_` and `-` (no dots: `--set nodes.NAME.KEY` splits on them)"
    } else {
        "use letters, digits and `_`"
    })
}

/// One node after matrix expansion.
pub(crate) struct Expanded {
    pub name: String,
    /// The template's key in the recipe.
    pub name_span: Span,
    pub kind: &'static str,
    /// The node's own parameters, then its kind's defaults, substituted.
    pub entries: Vec<Entry>,
    /// Recipe vars plus this expansion's matrix values.
    pub env: Env,
    /// Matrix variables used in the values but not in the name (collisions are certain).
    pub unnamed_vars: Vec<String>,
}

struct Context<'a> {
    env: &'a Env,
    matrix: &'a [(String, Vec<Yaml>)],
    defaults: &'a BTreeMap<&'static str, Vec<Entry>>,
    base: Option<&'a Yaml>,
    base_config: Option<&'a Yaml>,
    sources: &'a Sources,
}

fn expand_template(t: &Entry, cx: &Context<'_>, out: &mut Vec<Expanded>, diags: &mut Vec<Diag>) {
    let Some(body) = t.value.as_map() else {
        diags.push(
            Diag::new(
                "recipe::wrong_type",
                format!("node `{}` must be a mapping", t.key),
                t.value.span,
                format!("found {}", t.value.value.describe()),
            )
            .help("write `kind:` and the node's parameters under its name"),
        );
        return;
    };
    let kind = match body.iter().find(|e| e.key == "kind") {
        None => {
            diags.push(
                Diag::new(
                    "recipe::missing_key",
                    format!("node `{}` has no `kind`", t.key),
                    t.key_span,
                    "`kind` is required",
                )
                .help(format!("add `kind:` with one of: {}", KINDS.join(", "))),
            );
            return;
        }
        Some(k) => match &k.value.value {
            Value::Str(s) => match KINDS.iter().find(|c| *c == s) {
                Some(c) => *c,
                None => {
                    diags.push(unknown_kind(s, k.value.span));
                    return;
                }
            },
            other => {
                diags.push(
                    Diag::new(
                        "recipe::wrong_type",
                        "`kind` must be a name",
                        k.value.span,
                        format!("found {}", other.describe()),
                    )
                    .help(format!("one of: {}", KINDS.join(", "))),
                );
                return;
            }
        },
    };
    let allowed = params::param_names(kind);
    let mut entries: Vec<Entry> = Vec::new();
    for e in body.iter().filter(|e| e.key != "kind") {
        if allowed.contains(&e.key.as_str()) {
            entries.push(e.clone());
        } else {
            diags.push(unknown_param(kind, &e.key, e.key_span));
        }
    }
    for d in cx.defaults.get(kind).into_iter().flatten() {
        if !entries.iter().any(|e| e.key == d.key) {
            entries.push(d.clone());
        }
    }
    if let Some(base) = cx.base
        && KINDS_WITH_BASE.contains(&kind)
        && !entries.iter().any(|e| e.key == "base")
    {
        entries.push(Entry {
            key: "base".into(),
            key_span: base.span,
            value: base.clone(),
        });
    }
    if let Some(config) = cx.base_config
        && allowed.contains(&"base_config")
        && !entries.iter().any(|e| e.key == "base_config")
    {
        entries.push(Entry {
            key: "base_config".into(),
            key_span: config.span,
            value: config.clone(),
        });
    }

    let mut name_refs = expand::var_refs(&t.key, t.key_span, cx.sources.text(t.key_span.src));
    if name_refs.is_empty() && t.key.contains("${") {
        name_refs = vec![VarRef {
            name: String::new(),
            span: t.key_span,
        }];
    }
    let mut value_refs = Vec::new();
    for e in &entries {
        collect_refs(&e.value, cx.sources, &mut value_refs);
    }
    let mentioned = |name: &str, refs: &[VarRef]| refs.iter().any(|r| r.name == name);
    let used: Vec<(String, Vec<Yaml>)> = cx
        .matrix
        .iter()
        .filter(|(m, _)| mentioned(m, &name_refs) || mentioned(m, &value_refs))
        .cloned()
        .collect();
    let unnamed_vars: Vec<String> = used
        .iter()
        .filter(|(m, _)| !mentioned(m, &name_refs))
        .map(|(m, _)| m.clone())
        .collect();

    for binding in bindings(&used) {
        let mut env = cx.env.clone();
        env.values.extend(binding);
        let key = Yaml::new(Value::Str(t.key.clone()), t.key_span);
        let name = match substitute(&key, &env, cx.sources, diags).value {
            Value::Str(s) => s,
            Value::Poisoned => continue,
            other => other.scalar_text().unwrap_or_default(),
        };
        if !is_name(&name) {
            diags.push(bad_name(&name, t.key_span, "node"));
            continue;
        }
        let entries = entries
            .iter()
            .map(|e| Entry {
                key: e.key.clone(),
                key_span: e.key_span,
                value: substitute(&e.value, &env, cx.sources, diags),
            })
            .collect();
        out.push(Expanded {
            name,
            name_span: t.key_span,
            kind,
            entries,
            env,
            unnamed_vars: unnamed_vars.clone(),
        });
    }
}

fn reject_collisions(expanded: &mut Vec<Expanded>, diags: &mut Vec<Diag>) {
    let mut first: HashMap<String, Span> = HashMap::new();
    expanded.retain(|n| match first.get(&n.name) {
        None => {
            first.insert(n.name.clone(), n.name_span);
            true
        }
        Some(&span) => {
            let mut d = Diag::new(
                "recipe::name_collision",
                format!("two nodes are named `{}` after matrix expansion", n.name),
                n.name_span,
                format!("makes `{}`", n.name),
            );
            if span != n.name_span {
                d = d.with_label(span, format!("also makes `{}`", n.name));
            }
            diags.push(match n.unnamed_vars.first() {
                Some(v) => d.help(format!(
                    "`${{{v}}}` is used in this node's parameters but not in its name, so every \
                     expansion gets the same name: add `${{{v}}}` to the name"
                )),
                None => d.help("rename one of them"),
            });
            false
        }
    });
}

fn apply_node_override(
    o: Override,
    expanded: &mut [Expanded],
    sources: &Sources,
    diags: &mut Vec<Diag>,
) {
    let (name, name_span) = &o.path[1];
    let Some(node) = expanded.iter_mut().find(|n| &n.name == name) else {
        let names: Vec<&str> = expanded.iter().map(|n| n.name.as_str()).collect();
        diags.push(
            Diag::new(
                "recipe::bad_set",
                format!("no node is named `{name}`"),
                *name_span,
                "unknown node",
            )
            .help(suggest(name, "nodes", &names)),
        );
        return;
    };
    let (key, key_span) = &o.path[2];
    if key == "kind" {
        diags.push(
            Diag::new(
                "recipe::bad_set",
                "the kind of a node cannot be changed with `--set`",
                *key_span,
                "not a parameter",
            )
            .help("edit the recipe instead"),
        );
        return;
    }
    if !params::param_names(node.kind).contains(&key.as_str()) {
        diags.push(unknown_param(node.kind, key, *key_span));
        return;
    }
    let value = substitute(&o.value, &node.env, sources, diags);
    if let Err(d) = set_path(&mut node.entries, &o.path[2..], value) {
        diags.push(d);
    }
}

fn read_outputs(
    section: Option<&Entry>,
    overrides: Vec<Override>,
    env: &Env,
    matrix: &[(String, Vec<Yaml>)],
    resolver: &Resolver,
    sources: &Sources,
    diags: &mut Vec<Diag>,
) -> BTreeMap<String, PathBuf> {
    // node -> (path text, span of the path, span of the key)
    let mut wanted: Vec<(String, Yaml, Span)> = Vec::new();
    if let Some(e) = section {
        match &e.value.value {
            Value::Map(entries) => {
                for o in entries {
                    let mut refs =
                        expand::var_refs(&o.key, o.key_span, sources.text(o.key_span.src));
                    collect_refs(&o.value, sources, &mut refs);
                    let used: Vec<(String, Vec<Yaml>)> = matrix
                        .iter()
                        .filter(|(m, _)| refs.iter().any(|r| &r.name == m))
                        .cloned()
                        .collect();
                    for binding in bindings(&used) {
                        let mut env = env.clone();
                        env.values.extend(binding);
                        let key = Yaml::new(Value::Str(o.key.clone()), o.key_span);
                        let node_value = substitute(&key, &env, sources, diags).value;
                        if matches!(node_value, Value::Poisoned) {
                            continue;
                        }
                        let node = node_value.scalar_text().unwrap_or_default();
                        let path = substitute(&o.value, &env, sources, diags);
                        wanted.push((node, path, o.key_span));
                    }
                }
            }
            Value::Null => {}
            _ => diags.push(mapping_expected(
                "outputs",
                &e.value,
                "`outputs: {eyesize: eyesize.safetensors}`",
            )),
        }
    }
    for o in overrides {
        let (node, span) = o.path[1].clone();
        let value = substitute(&o.value, env, sources, diags);
        wanted.retain(|(n, _, _)| *n != node);
        wanted.push((node, value, span));
    }
    let mut out = BTreeMap::new();
    let mut by_path: HashMap<PathBuf, Span> = HashMap::new();
    let mut by_node: HashMap<String, Span> = HashMap::new();
    for (node, path, key_span) in wanted {
        if !resolver.name_set.contains(&node) {
            diags.push(
                Diag::new(
                    "recipe::unknown_node",
                    format!("output names an unknown node `{node}`"),
                    key_span,
                    "no node has this name",
                )
                .help(
                    closest(&node, resolver.names.iter().map(String::as_str)).map_or_else(
                        || "keys of `outputs` are node names".to_owned(),
                        |c| format!("did you mean `{c}`?"),
                    ),
                ),
            );
            continue;
        }
        let text = match &path.value {
            Value::Str(s) if !s.trim().is_empty() => s.clone(),
            other => {
                diags.push(
                    Diag::new(
                        "recipe::wrong_type",
                        format!("the output path of `{node}` must be a file path"),
                        path.span,
                        format!("found {}", other.describe()),
                    )
                    .help("e.g. `eyesize: out/eyesize.safetensors`"),
                );
                continue;
            }
        };
        if let Some(first) = by_node.get(&node) {
            diags.push(
                Diag::new(
                    "recipe::duplicate_key",
                    format!("`{node}` is published twice"),
                    key_span,
                    "published again here",
                )
                .with_label(*first, "first here")
                .help("a node is published to one path; remove one of them"),
            );
            continue;
        }
        let abs = params_normalize(&resolver.root.join(&text));
        if let Some(first) = by_path.get(&abs) {
            diags.push(
                Diag::new(
                    "recipe::duplicate_key",
                    format!("two outputs are published to `{text}`"),
                    path.span,
                    "same path again",
                )
                .with_label(*first, "first here")
                .help("give each output its own path"),
            );
            continue;
        }
        by_path.insert(abs.clone(), path.span);
        by_node.insert(node.clone(), key_span);
        out.insert(node, abs);
    }
    out
}

fn params_normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn produces_of(kind: &str, params: Option<&NodeParams>) -> Option<Produces> {
    match (kind, params) {
        (_, Some(p)) => Some(params::produces(p)),
        ("command", None) => None,
        ("xy_plot", None) => Some(Produces::Image),
        ("evaluate", None) => Some(Produces::OtherFile),
        ("merge_into_model", None) => Some(Produces::Model),
        _ => Some(Produces::Lora),
    }
}

fn check_types(
    expanded: &[Expanded],
    decoded: &[Option<NodeParams>],
    refs: &[RefUse],
    diags: &mut Vec<Diag>,
) {
    let by_name: HashMap<&str, usize> = expanded
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    for r in refs {
        let Some(&i) = by_name.get(r.to.as_str()) else {
            continue;
        };
        let kind = expanded[i].kind;
        let Some(what) = produces_of(kind, decoded[i].as_ref()) else {
            continue;
        };
        let Some(why) = params::slot_refusal(r.slot, kind, what) else {
            continue;
        };
        let (needs, makes) = (
            match r.slot {
                Slot::Lora => "a LoRA",
                Slot::Model => "a base model",
                Slot::Image => "an image",
                Slot::Meter => "an eye meter",
                Slot::Config => "a diffusers config.json",
                Slot::Any => "a file",
            },
            match what {
                Produces::Lora => "a LoRA",
                Produces::Model => "a model checkpoint",
                Produces::Image => "an image",
                Produces::OtherFile => "a file that is neither a LoRA nor an image",
            },
        );
        diags.push(
            Diag::new(
                "recipe::type_mismatch",
                format!(
                    "`{}` of `{}` needs {needs}, but `{}` is {} `{kind}` node, which makes {makes}",
                    r.key,
                    r.from,
                    r.to,
                    if kind.starts_with(['a', 'e', 'i', 'o', 'u', 'x']) {
                        "an"
                    } else {
                        "a"
                    }
                ),
                r.span,
                format!("makes {makes}"),
            )
            .help(why),
        );
    }
}

fn check_cycles(expanded: &[Expanded], refs: &[RefUse], diags: &mut Vec<Diag>) {
    let index: HashMap<&str, usize> = expanded
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut g: DiGraph<usize, Span> = DiGraph::new();
    let ids: Vec<NodeIndex> = (0..expanded.len()).map(|i| g.add_node(i)).collect();
    for r in refs {
        if let (Some(&a), Some(&b)) = (index.get(r.from.as_str()), index.get(r.to.as_str())) {
            g.add_edge(ids[a], ids[b], r.span);
        }
    }
    let mut sccs = petgraph::algo::tarjan_scc(&g);
    sccs.iter_mut().for_each(|c| c.sort());
    sccs.sort();
    for scc in sccs {
        let start = scc[0];
        let self_loop = g.find_edge(start, start);
        if scc.len() == 1 && self_loop.is_none() {
            continue;
        }
        let members: HashSet<NodeIndex> = scc.iter().copied().collect();
        let cycle = shortest_cycle(&g, start, &members);
        let names: Vec<&str> = cycle
            .iter()
            .map(|&n| expanded[g[n]].name.as_str())
            .collect();
        let mut d: Option<Diag> = None;
        for w in cycle.windows(2) {
            let Some(e) = g.find_edge(w[0], w[1]) else {
                continue;
            };
            let label = format!(
                "`{}` reads `{}`",
                expanded[g[w[0]]].name, expanded[g[w[1]]].name
            );
            d = Some(match d {
                None => Diag::new(
                    "recipe::cycle",
                    format!("cycle: {}", names.join(" -> ")),
                    g[e],
                    label,
                ),
                Some(d) => d.with_label(g[e], label),
            });
        }
        if let Some(d) = d {
            diags.push(
                d.help("a node cannot depend on its own output; remove one of these references"),
            );
        }
    }
}

/// `start -> ... -> start` by breadth-first search inside one strongly connected component.
fn shortest_cycle(
    g: &DiGraph<usize, Span>,
    start: NodeIndex,
    members: &HashSet<NodeIndex>,
) -> Vec<NodeIndex> {
    let mut prev: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        let mut next: Vec<NodeIndex> = g.neighbors(n).collect();
        next.sort();
        for m in next {
            if m == start {
                let mut path = vec![n];
                let mut at = n;
                while at != start {
                    at = prev[&at];
                    path.push(at);
                }
                path.reverse();
                path.push(start);
                return path;
            }
            if members.contains(&m) && !prev.contains_key(&m) && m != start {
                prev.insert(m, n);
                queue.push_back(m);
            }
        }
    }
    vec![start, start]
}

/// Inputs before consumers; among ready nodes, recipe order.
fn topological_order(expanded: &[Expanded], refs: &[RefUse]) -> Vec<usize> {
    let index: HashMap<&str, usize> = expanded
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut consumers: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); expanded.len()];
    let mut pending = vec![0usize; expanded.len()];
    for r in refs {
        if let (Some(&from), Some(&to)) = (index.get(r.from.as_str()), index.get(r.to.as_str()))
            && consumers[to].insert(from)
        {
            pending[from] += 1;
        }
    }
    let mut ready: BTreeSet<usize> = (0..expanded.len()).filter(|&i| pending[i] == 0).collect();
    let mut order = Vec::with_capacity(expanded.len());
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &c in &consumers[i] {
            pending[c] -= 1;
            if pending[c] == 0 {
                ready.insert(c);
            }
        }
    }
    order
}

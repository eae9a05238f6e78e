//! `${var}` substitution, matrix expansion and `--set` overrides: everything that rewrites
//! the YAML tree before it is read as typed parameters.

use crate::diag::{Diag, SourceId, Sources, Span, closest, did_you_mean};
use crate::yaml::{self, Entry, Value, Yaml};

/// One `--set PATH=VALUE`, parsed.
#[derive(Debug, Clone)]
pub(crate) struct Override {
    /// Dotted path segments with their spans in the override's source.
    pub path: Vec<(String, Span)>,
    pub value: Yaml,
}

/// Parses `a.b.c=VALUE`; the value is YAML (`10`, `0.75`, `[front, side]`, `"text"`).
pub(crate) fn parse_override(text: &str, src: SourceId) -> Result<Override, Diag> {
    let whole = Span::new(src, 0, text.len());
    let Some(eq) = text.find('=') else {
        return Err(Diag::new(
            "recipe::bad_set",
            format!("`--set {text}` has no `=`"),
            whole,
            "expected PATH=VALUE",
        )
        .help("write it like `--set train.max_train_steps=10`"));
    };
    let mut path = Vec::new();
    let mut start = 0;
    for seg in text[..eq].split('.') {
        let span = Span::new(src, start, start + seg.len());
        let trimmed = seg.trim();
        if trimmed.is_empty() {
            return Err(Diag::new(
                "recipe::bad_set",
                "empty name in a `--set` path",
                Span::new(src, start, start + seg.len().max(1)),
                "nothing between these dots",
            )
            .help("write it like `--set nodes.big_front.seed=3`"));
        }
        path.push((trimmed.to_owned(), span));
        start += seg.len() + 1;
    }
    let value = yaml::parse(&text[eq + 1..], src, eq + 1)?;
    Ok(Override { path, value })
}

/// Sets `path` (a chain of mapping keys) in `map` to `value`, creating mappings on the way.
pub(crate) fn set_path(
    map: &mut Vec<Entry>,
    path: &[(String, Span)],
    value: Yaml,
) -> Result<(), Diag> {
    let Some(((key, key_span), rest)) = path.split_first() else {
        return Ok(());
    };
    let pos = match map.iter().position(|e| &e.key == key) {
        Some(p) => p,
        None => {
            let placeholder = Yaml::new(Value::Map(Vec::new()), *key_span);
            map.push(Entry {
                key: key.clone(),
                key_span: *key_span,
                value: placeholder,
            });
            map.len() - 1
        }
    };
    if rest.is_empty() {
        map[pos].value = value;
        return Ok(());
    }
    match &mut map[pos].value.value {
        Value::Map(inner) => set_path(inner, rest, value),
        Value::Null => {
            map[pos].value.value = Value::Map(Vec::new());
            let Value::Map(inner) = &mut map[pos].value.value else {
                unreachable!("just set to a map")
            };
            set_path(inner, rest, value)
        }
        other => Err(Diag::new(
            "recipe::bad_set",
            format!("cannot set `{}` inside `{key}`", rest[0].0),
            rest[0].1,
            format!("`{key}` is {}, not a mapping", other.describe()),
        )),
    }
}

/// A `${name}` occurrence in a string.
#[derive(Debug, Clone)]
pub(crate) struct VarRef {
    pub name: String,
    /// The span of `${name}` itself when it can be located in the source, else of the string.
    pub span: Span,
}

/// Finds `${name}` references in one string value. `$${` is an escaped literal `${`.
pub(crate) fn var_refs(s: &str, span: Span, source: &str) -> Vec<VarRef> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            rest = &rest[i + 2..];
            continue;
        }
        let after = &rest[i + 2..];
        let Some(close) = after.find('}') else { break };
        let name = after[..close].trim().to_owned();
        let needle = format!("${{{}}}", &after[..close]);
        let text = source.get(span.start..span.end).unwrap_or("");
        let precise = text
            .find(&needle)
            .map(|at| Span::new(span.src, span.start + at, span.start + at + needle.len()))
            .unwrap_or(span);
        out.push(VarRef {
            name,
            span: precise,
        });
        rest = &after[close + 1..];
    }
    out
}

/// Every `${...}` reference anywhere inside a value (strings only; keys are literal).
pub(crate) fn collect_refs(y: &Yaml, sources: &Sources, out: &mut Vec<VarRef>) {
    match &y.value {
        Value::Str(s) => out.extend(var_refs(s, y.span, sources.text(y.span.src))),
        Value::Seq(items) => items.iter().for_each(|i| collect_refs(i, sources, out)),
        Value::Map(entries) => entries
            .iter()
            .for_each(|e| collect_refs(&e.value, sources, out)),
        _ => {}
    }
}

/// Variable values visible while substituting: recipe `vars` plus the current matrix binding.
#[derive(Debug, Clone, Default)]
pub(crate) struct Env {
    pub values: Vec<(String, Yaml)>,
    /// Names that exist but are not bound here (matrix variables a node does not use), for
    /// "did you mean" only.
    pub unbound: Vec<String>,
}

impl Env {
    pub fn get(&self, name: &str) -> Option<&Yaml> {
        self.values
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.values
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.unbound.iter().map(String::as_str))
    }
}

/// Replaces `${name}` in every string of `y`. A string that is exactly one reference takes
/// the variable's value with its type (`seed: ${seed}` stays a number); otherwise the value
/// is interpolated as text. Spans stay at the reference site.
pub(crate) fn substitute(y: &Yaml, env: &Env, source: &Sources, diags: &mut Vec<Diag>) -> Yaml {
    match &y.value {
        Value::Str(s) if s.contains("${") => substitute_str(s, y.span, env, source, diags),
        Value::Seq(items) => Yaml::new(
            Value::Seq(
                items
                    .iter()
                    .map(|i| substitute(i, env, source, diags))
                    .collect(),
            ),
            y.span,
        ),
        Value::Map(entries) => Yaml::new(
            Value::Map(
                entries
                    .iter()
                    .map(|e| Entry {
                        key: e.key.clone(),
                        key_span: e.key_span,
                        value: substitute(&e.value, env, source, diags),
                    })
                    .collect(),
            ),
            y.span,
        ),
        _ => y.clone(),
    }
}

fn substitute_str(s: &str, span: Span, env: &Env, source: &Sources, diags: &mut Vec<Diag>) -> Yaml {
    let refs = var_refs(s, span, source.text(span.src));
    let lookup = |r: &VarRef, diags: &mut Vec<Diag>| -> Option<Yaml> {
        match env.get(&r.name) {
            Some(v) if matches!(v.value, Value::Null) => {
                diags.push(
                    Diag::new(
                        "recipe::unset_var",
                        format!("variable `{}` has no value", r.name),
                        r.span,
                        "used here",
                    )
                    .help(format!(
                        "give it one in `vars:` or on the command line: `--set vars.{}=VALUE`",
                        r.name
                    )),
                );
                None
            }
            Some(v) => Some(v.clone()),
            None => {
                diags.push(undefined_var(r, env.names()));
                None
            }
        }
    };
    let whole = s.trim();
    if refs.len() == 1 && whole.starts_with("${") && whole.ends_with('}') && whole.len() > 3 {
        let inner = &whole[2..whole.len() - 1];
        if !inner.contains("${") {
            return match lookup(&refs[0], diags) {
                Some(v) => Yaml::new(v.value, span),
                None => Yaml::new(Value::Poisoned, span),
            };
        }
    }
    let mut out = String::new();
    let mut rest = s;
    let mut failed = false;
    let mut refs = refs.iter();
    while let Some(i) = rest.find("${") {
        if rest[..i].ends_with('$') {
            out.push_str(&rest[..i - 1]);
            out.push_str("${");
            rest = &rest[i + 2..];
            continue;
        }
        let after = &rest[i + 2..];
        let Some(close) = after.find('}') else { break };
        out.push_str(&rest[..i]);
        if let Some(r) = refs.next() {
            match lookup(r, diags) {
                Some(v) => match v.value.scalar_text() {
                    Some(t) => out.push_str(&t),
                    None => {
                        failed = true;
                        diags.push(
                            Diag::new(
                                "recipe::bad_var",
                                format!(
                                    "`{}` is {} and cannot be put inside a string",
                                    r.name,
                                    v.value.describe()
                                ),
                                r.span,
                                "used inside this string",
                            )
                            .help(format!("use `${{{}}}` alone as the whole value", r.name)),
                        )
                    }
                },
                None => failed = true,
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    if failed {
        return Yaml::new(Value::Poisoned, span);
    }
    Yaml::new(Value::Str(out), span)
}

pub(crate) fn undefined_var<'a>(r: &VarRef, names: impl Iterator<Item = &'a str>) -> Diag {
    let names: Vec<&str> = names.collect();
    Diag::new(
        "recipe::undefined_var",
        format!("undefined variable `{}`", r.name),
        r.span,
        "not in `vars` or `matrix`",
    )
    .help(match closest(&r.name, names.iter().copied()) {
        Some(c) => format!("did you mean `{c}`?"),
        None => format!(
            "declare it under `vars:` or `matrix:`{}",
            if names.is_empty() {
                String::new()
            } else {
                format!(" (defined: {})", names.join(", "))
            }
        ),
    })
}

/// The cross product of the matrix variables a template uses, in matrix declaration order.
pub(crate) fn bindings(used: &[(String, Vec<Yaml>)]) -> Vec<Vec<(String, Yaml)>> {
    let mut out: Vec<Vec<(String, Yaml)>> = vec![Vec::new()];
    for (name, values) in used {
        out = out
            .into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |v| {
                    let mut b = prefix.clone();
                    b.push((name.clone(), v.clone()));
                    b
                })
            })
            .collect();
    }
    out
}

/// Suggestion for an unknown name among `candidates`, or a list of them.
pub(crate) fn suggest(word: &str, what: &str, candidates: &[&str]) -> String {
    did_you_mean(word, candidates.iter().copied()).unwrap_or_else(|| {
        if candidates.is_empty() {
            format!("there are no {what}")
        } else {
            format!("{what}: {}", candidates.join(", "))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Yaml {
        Yaml::new(Value::Str(text.to_owned()), Span::new(0, 0, text.len()))
    }

    fn env() -> Env {
        let num = |v: Value| Yaml::new(v, Span::new(0, 0, 0));
        Env {
            values: vec![
                ("angle".into(), num(Value::Str("front".into()))),
                ("seed".into(), num(Value::Int(7))),
                ("missing".into(), num(Value::Null)),
            ],
            unbound: Vec::new(),
        }
    }

    #[test]
    fn substitution_keeps_types_of_whole_references_and_interpolates_the_rest() {
        let cases: &[(&str, &str)] = &[
            ("small_${angle}", "Str(\"small_front\")"),
            ("${seed}", "Int(7)"),
            ("seed ${seed}", "Str(\"seed 7\")"),
            ("$${angle} literal", "Str(\"${angle} literal\")"),
            ("no refs", "Str(\"no refs\")"),
            ("${angle}/${seed}", "Str(\"front/7\")"),
        ];
        for (text, expected) in cases {
            let mut diags = Vec::new();
            let source = Sources::new("t".into(), text);
            let out = substitute(&s(text), &env(), &source, &mut diags);
            assert!(diags.is_empty(), "{text}: {diags:?}");
            assert_eq!(format!("{:?}", out.value), *expected, "{text}");
        }
    }

    #[test]
    fn unknown_and_unset_variables_are_errors() {
        let cases = [
            ("${angel}", "recipe::undefined_var"),
            ("x_${missing}", "recipe::unset_var"),
        ];
        for (text, code) in cases {
            let mut diags = Vec::new();
            let source = Sources::new("t".into(), text);
            substitute(&s(text), &env(), &source, &mut diags);
            assert_eq!(diags.len(), 1, "{text}");
            assert_eq!(diags[0].code, code, "{text}");
        }
    }

    #[test]
    fn cross_product_of_used_matrix_variables() {
        let v = |t: &str| s(t);
        let used = vec![
            ("a".to_string(), vec![v("1"), v("2")]),
            ("b".to_string(), vec![v("x"), v("y"), v("z")]),
        ];
        let b = bindings(&used);
        assert_eq!(b.len(), 6);
        assert_eq!(b[1][1].0, "b");
        assert!(matches!(&b[1][1].1.value, Value::Str(t) if t == "y"));
    }

    #[test]
    fn overrides_parse_paths_and_yaml_values() {
        let o = parse_override("train.max_train_steps=10", 1).unwrap();
        assert_eq!(o.path.len(), 2);
        assert_eq!(o.path[1].0, "max_train_steps");
        assert_eq!(o.path[1].1, Span::new(1, 6, 21));
        assert!(matches!(o.value.value, Value::Int(10)));
        let o = parse_override("matrix.angle=[front, side]", 1).unwrap();
        assert!(matches!(&o.value.value, Value::Seq(v) if v.len() == 2));
        assert!(parse_override("train.max_train_steps", 1).is_err());
        assert!(parse_override("train..x=1", 1).is_err());
    }
}

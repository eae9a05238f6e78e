//! A YAML document tree in which every value and every mapping key keeps its byte span, so
//! that any later error can point at the exact text. Built from `saphyr-parser` events.

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError, Span as YamlSpan};

use crate::diag::{Diag, SourceId, Span};

/// A YAML value with the span of its text.
#[derive(Debug, Clone)]
pub(crate) struct Yaml {
    pub value: Value,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A string (only unquoted scalars are typed, so `"3"` stays a string).
    Str(String),
    Seq(Vec<Yaml>),
    Map(Vec<Entry>),
    /// A string whose `${...}` could not be substituted; the problem is already reported, so
    /// readers skip it silently instead of piling follow-up errors on it.
    Poisoned,
}

/// One `key: value` pair of a mapping, in document order.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_span: Span,
    pub value: Yaml,
}

impl Value {
    /// What a user would call this value's type, for "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "nothing (null)".into(),
            Value::Bool(b) => format!("the boolean `{b}`"),
            Value::Int(i) => format!("the number `{i}`"),
            Value::Float(f) => format!("the number `{f}`"),
            Value::Str(s) => format!("the string `{s}`"),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
            Value::Poisoned => "an invalid value".into(),
        }
    }

    /// The text of a scalar as it would be interpolated into a string.
    pub fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Str(s) => Some(s.clone()),
            Value::Null | Value::Seq(_) | Value::Map(_) | Value::Poisoned => None,
        }
    }
}

impl Yaml {
    pub fn new(value: Value, span: Span) -> Self {
        Yaml { value, span }
    }

    pub fn as_map(&self) -> Option<&[Entry]> {
        match &self.value {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }
}

/// Parses one YAML document. `offset` is added to every span (used when the text is a slice
/// of a larger source, like the value part of a `--set KEY=VALUE`).
pub(crate) fn parse(text: &str, src: SourceId, offset: usize) -> Result<Yaml, Diag> {
    let positions = CharToByte::new(text);
    let mut builder = Builder {
        parser: Parser::new_from_str(text),
        positions,
        src,
        offset,
        anchors: Vec::new(),
        text_len: text.len(),
        text,
    };
    builder.document()
}

/// saphyr reports positions in characters; miette wants bytes.
struct CharToByte {
    /// Byte offset of each char, or empty when the text is ASCII (identity).
    table: Vec<usize>,
    len: usize,
}

impl CharToByte {
    fn new(text: &str) -> Self {
        let table = if text.is_ascii() {
            Vec::new()
        } else {
            text.char_indices().map(|(b, _)| b).collect()
        };
        CharToByte {
            table,
            len: text.len(),
        }
    }

    fn byte(&self, char_index: usize) -> usize {
        if self.table.is_empty() {
            char_index.min(self.len)
        } else {
            self.table.get(char_index).copied().unwrap_or(self.len)
        }
    }
}

struct Builder<'a> {
    parser: Parser<'a, saphyr_parser::StrInput<'a>>,
    positions: CharToByte,
    src: SourceId,
    offset: usize,
    /// Anchored values by anchor id, for aliases (`*name`).
    anchors: Vec<(usize, Yaml)>,
    text_len: usize,
    text: &'a str,
}

impl<'a> Builder<'a> {
    fn span(&self, s: YamlSpan) -> Span {
        let start = self.positions.byte(s.start.index());
        let end = self.positions.byte(s.end.index()).max(start);
        Span::new(self.src, self.offset + start, self.offset + end)
    }

    fn next(&mut self) -> Result<(Event<'a>, YamlSpan), Diag> {
        match self.parser.next_event() {
            Some(Ok(ev)) => Ok(ev),
            Some(Err(e)) => Err(self.scan_error(&e)),
            None => Err(Diag::new(
                "recipe::yaml",
                "invalid YAML: unexpected end of input",
                Span::new(
                    self.src,
                    self.offset + self.text_len,
                    self.offset + self.text_len,
                ),
                "the document ends here",
            )),
        }
    }

    fn scan_error(&self, e: &ScanError) -> Diag {
        let local = self.positions.byte(e.marker().index());
        let at = self.offset + local;
        let line_start = self.text[..local.min(self.text.len())]
            .rfind('\n')
            .map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next().unwrap_or("");
        let help = if line.contains("${") && (line.contains('[') || line.contains('{')) {
            "inside `[...]` and `{...}`, YAML reads `{` as the start of a mapping: quote the \
             strings that use variables, e.g. `[\"big_${angle}\", \"small_${angle}\"]`"
        } else {
            "check the indentation and quoting around this point"
        };
        Diag::new(
            "recipe::yaml",
            format!("invalid YAML: {}", e.info()),
            Span::new(self.src, at, at),
            "here",
        )
        .help(help)
    }

    fn document(&mut self) -> Result<Yaml, Diag> {
        loop {
            let (ev, span) = self.next()?;
            match ev {
                Event::StreamStart | Event::DocumentStart(_) | Event::Nothing => continue,
                Event::StreamEnd => {
                    return Ok(Yaml::new(Value::Null, self.span(span)));
                }
                other => {
                    let doc = self.value(other, span)?;
                    self.expect_end()?;
                    return Ok(doc);
                }
            }
        }
    }

    /// A recipe is one document: a second one (after `---`) would be silently ignored.
    fn expect_end(&mut self) -> Result<(), Diag> {
        loop {
            let (ev, span) = self.next()?;
            match ev {
                Event::DocumentEnd | Event::Nothing => continue,
                Event::StreamEnd => return Ok(()),
                _ => {
                    return Err(Diag::new(
                        "recipe::yaml",
                        "a recipe is a single YAML document",
                        self.span(span),
                        "a second document starts here",
                    )
                    .help("remove the `---` line and merge the documents"));
                }
            }
        }
    }

    fn value(&mut self, ev: Event<'a>, span: YamlSpan) -> Result<Yaml, Diag> {
        let start = self.span(span);
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let forced_string = tag.as_ref().is_some_and(|t| t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !forced_string {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.into_owned())
                };
                let y = Yaml::new(value, start);
                self.remember(anchor, &y);
                Ok(y)
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                let end = loop {
                    let (ev, span) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break self.span(span);
                    }
                    items.push(self.value(ev, span)?);
                };
                let y = Yaml::new(Value::Seq(items), start.to(end));
                self.remember(anchor, &y);
                Ok(y)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<Entry> = Vec::new();
                let end = loop {
                    let (ev, span) = self.next()?;
                    if ev == Event::MappingEnd {
                        break self.span(span);
                    }
                    let key = self.value(ev, span)?;
                    let (ev, span) = self.next()?;
                    let value = self.value(ev, span)?;
                    let Some(name) = key.value.scalar_text() else {
                        return Err(Diag::new(
                            "recipe::yaml",
                            "mapping keys must be plain names",
                            key.span,
                            "this key is a list or mapping",
                        ));
                    };
                    if let Some(first) = entries.iter().find(|e| e.key == name) {
                        return Err(Diag::new(
                            "recipe::duplicate_key",
                            format!("`{name}` is given twice"),
                            key.span,
                            "given again here",
                        )
                        .with_label(first.key_span, "first given here")
                        .help("remove one of them"));
                    }
                    entries.push(Entry {
                        key: name,
                        key_span: key.span,
                        value,
                    });
                };
                let y = Yaml::new(Value::Map(entries), start.to(end));
                self.remember(anchor, &y);
                Ok(y)
            }
            Event::Alias(id) => match self.anchors.iter().rev().find(|(a, _)| *a == id) {
                Some((_, y)) => Ok(Yaml::new(y.value.clone(), start)),
                None => Err(Diag::new(
                    "recipe::yaml",
                    "alias to an unknown anchor",
                    start,
                    "no anchor with this name before here",
                )),
            },
            other => Err(Diag::new(
                "recipe::yaml",
                format!("invalid YAML: unexpected {other:?}"),
                start,
                "here",
            )),
        }
    }

    fn remember(&mut self, anchor: usize, y: &Yaml) {
        if anchor != 0 {
            self.anchors.push((anchor, y.clone()));
        }
    }
}

/// YAML 1.2 core schema resolution of an unquoted scalar.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(i) = s.parse::<i64>()
    {
        return Value::Int(i);
    }
    let numeric_chars = s
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    if numeric_chars
        && s.bytes().any(|b| b.is_ascii_digit())
        && let Ok(f) = s.parse::<f64>()
    {
        return Value::Float(f);
    }
    Value::Str(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of<'t>(src: &'t str, y: &Yaml) -> &'t str {
        &src[y.span.start..y.span.end]
    }

    #[test]
    fn scalars_resolve_like_yaml_core_schema() {
        let cases: &[(&str, &str)] = &[
            ("3", "Int(3)"),
            ("-4", "Int(-4)"),
            ("0.75", "Float(0.75)"),
            ("5e-5", "Float(5e-5)"),
            ("1.5e3", "Float(1500.0)"),
            ("true", "Bool(true)"),
            ("~", "Null"),
            ("'3'", "Str(\"3\")"),
            ("\"true\"", "Str(\"true\")"),
            ("45deg", "Str(\"45deg\")"),
            ("1girl", "Str(\"1girl\")"),
            ("!!str 3", "Str(\"3\")"),
        ];
        for (text, expected) in cases {
            let y = parse(text, 0, 0).unwrap();
            assert_eq!(format!("{:?}", y.value), *expected, "{text}");
        }
    }

    #[test]
    fn spans_cover_the_text_of_keys_and_values() {
        let src = "a: 1\nb:\n  c: \"quoted x\"\n  d: [x, 'y']\né: plain text\n";
        let y = parse(src, 0, 0).unwrap();
        let map = y.as_map().unwrap();
        assert_eq!(&src[map[0].key_span.start..map[0].key_span.end], "a");
        assert_eq!(text_of(src, &map[0].value), "1");
        let inner = map[1].value.as_map().unwrap();
        assert_eq!(text_of(src, &inner[0].value), "\"quoted x\"");
        let Value::Seq(items) = &inner[1].value.value else {
            panic!()
        };
        assert_eq!(text_of(src, &items[0]), "x");
        assert_eq!(text_of(src, &items[1]), "'y'");
        assert_eq!(&src[map[2].key_span.start..map[2].key_span.end], "é");
        assert_eq!(text_of(src, &map[2].value), "plain text");
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_are_reported() {
        let e = parse("a: 1\na: 2\n", 0, 0).unwrap_err();
        assert_eq!(e.code, "recipe::duplicate_key");
        let e = parse("a: [1, 2\n", 0, 0).unwrap_err();
        assert_eq!(e.code, "recipe::yaml");
        let e = parse("a: 1\n---\nb: 2\n", 0, 0).unwrap_err();
        assert_eq!(e.message, "a recipe is a single YAML document");
        assert!(parse("a: 1\n...\n", 0, 0).is_ok());
    }

    #[test]
    fn aliases_copy_the_anchored_value() {
        let y = parse("a: &r [1, 2]\nb: *r\n", 0, 0).unwrap();
        let map = y.as_map().unwrap();
        assert!(matches!(&map[1].value.value, Value::Seq(v) if v.len() == 2));
    }
}

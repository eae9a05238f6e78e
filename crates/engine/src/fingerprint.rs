//! Node keys: the decision "has this node's result already been computed?".
//!
//! A node's key is blake3 over a canonical JSON document built from the node. Two nodes with
//! the same key produce the same outputs, so a key present in the store is a finished node.
//!
//! | Part of the node                           | In the key? | Why |
//! |--------------------------------------------|-------------|-----|
//! | kind (`svd_merge`, `command`, ...)         | yes | different programs, different results |
//! | parameters, canonical (sorted keys, `1.0` and `1` alike) | yes | they change the output; formatting does not |
//! | content hash of each input file            | yes | the bytes are what the node reads |
//! | content hash of each input node's primary output | yes | early cut-off: a re-run upstream node with byte-identical output keeps this node fresh |
//! | the executor's code version (per kind)     | yes | bumped when the same inputs would give other bytes |
//! | the trainer (`trainer: sd-scripts`; absent at the default `burn`) | yes | another program, other bytes; absent at the default so existing keys stay |
//! | for sd-scripts, its checkout's commit and the sd-scripts executor's code version (instead of the kind's) | yes | another sd-scripts, other bytes; our burn trainer's version does not concern it |
//! | the sd-scripts checkout's path and Python  | no  | where a program is installed is not what it computes |
//! | node name                                  | no  | renaming a node re-runs nothing |
//! | input file paths                           | no  | moving a file with identical content re-runs nothing |
//! | input file mtimes                          | no  | touching a file re-runs nothing; mtimes only index the hash memo |
//! | input nodes' keys                          | no  | replaced by their output content (early cut-off, above) |
//! | publish paths (`outputs:`)                 | no  | publishing copies finished results; it is not part of computing them |
//! | `--jobs`, `--devices`, the store location  | no  | scheduling does not change results |
//! | a `command`'s program file                 | no, unless declared in `inputs` | only declared inputs are read by contract |
//!
//! File hashes are memoised by (path, size, mtime, inode) in the store ([`FileHashMemo`]): a
//! multi-gigabyte base model is hashed once, and later runs only `stat` it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use slider_recipe::{Input, NodeParams};

use crate::error::EngineError;
use crate::fsutil;

/// Domain separation for the key hash; change it only with a store format change.
const KEY_SCHEMA: &str = "slider-run node key v1\n";

/// Where an input of a fingerprint came from, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputOrigin {
    File(PathBuf),
    Node(String),
}

/// One input as it entered the key: its place in the document, its origin and its content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSource {
    /// Path in the canonical document, e.g. `params.models[1]`.
    pub at: String,
    pub origin: InputOrigin,
    /// Content hash, or `None` when the input node has not produced its output yet.
    pub hash: Option<String>,
}

/// A node's canonical document and, when every input's content is known, its key.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    pub doc: Value,
    pub sources: Vec<InputSource>,
    pub key: Option<String>,
}

/// Builds the fingerprint of a node. `resolve` returns an input's content hash, or `None`
/// when it is not known yet (an upstream node that has to run first).
pub fn fingerprint(
    params: &NodeParams,
    code_version: u32,
    mut resolve: impl FnMut(&Input) -> Result<Option<String>, EngineError>,
) -> Result<Fingerprint, EngineError> {
    let mut params_json = serde_json::to_value(params)
        .map_err(|e| EngineError::Internal(format!("serialising node parameters: {e}")))?;
    let mut expected: Vec<&Input> = params.inputs();
    let mut sources = Vec::new();
    replace_inputs(
        &mut params_json,
        "params".to_string(),
        &mut expected,
        &mut sources,
        &mut resolve,
    )?;
    if !expected.is_empty() {
        return Err(EngineError::Internal(format!(
            "{} input(s) of a `{}` node were not found in its serialised parameters",
            expected.len(),
            params.kind()
        )));
    }
    normalise_numbers(&mut params_json);
    let mut doc = Map::new();
    doc.insert("kind".into(), Value::String(params.kind().into()));
    doc.insert("code_version".into(), Value::from(code_version));
    doc.insert("params".into(), params_json);
    if let Some(commit) = crate::sd_scripts::trainer_revision(params)? {
        doc.insert(
            "code_version".into(),
            Value::from(crate::sd_scripts::SD_SCRIPTS_CODE_VERSION),
        );
        doc.insert("trainer_revision".into(), Value::String(commit));
    }
    let doc = Value::Object(doc);
    let key = sources
        .iter()
        .all(|s| s.hash.is_some())
        .then(|| key_of(&doc));
    Ok(Fingerprint { doc, sources, key })
}

/// blake3 of the canonical text of a document, hex.
pub fn key_of(doc: &Value) -> String {
    let mut text = String::from(KEY_SCHEMA);
    write_canonical(doc, &mut text);
    blake3::hash(text.as_bytes()).to_hex().to_string()
}

/// JSON with object keys sorted and no whitespace; independent of serde_json's map order.
pub fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Integral floats become integers (`1.0` == `1`), `-0.0` becomes `0`.
fn normalise_numbers(v: &mut Value) {
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64())
                && f.fract() == 0.0
                && f.abs() < 9.007_199_254_740_992e15
            {
                *n = Number::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalise_numbers),
        Value::Object(map) => map.values_mut().for_each(normalise_numbers),
        _ => {}
    }
}

/// Replaces every serialised `Input` (`{"Node": name}` / `{"File": path}`) that is one of the
/// node's declared inputs by its content: `"blake3:<hex>"`, or `"pending"`.
fn replace_inputs(
    v: &mut Value,
    at: String,
    expected: &mut Vec<&Input>,
    sources: &mut Vec<InputSource>,
    resolve: &mut impl FnMut(&Input) -> Result<Option<String>, EngineError>,
) -> Result<(), EngineError> {
    if let Some(input) = as_input(v)
        && let Some(pos) = expected.iter().position(|e| **e == input)
    {
        expected.swap_remove(pos);
        let hash = resolve(&input)?;
        *v = Value::String(match &hash {
            Some(h) => format!("blake3:{h}"),
            None => "pending".into(),
        });
        let origin = match input {
            Input::File(p) => InputOrigin::File(p),
            Input::Node(n) => InputOrigin::Node(n),
        };
        sources.push(InputSource { at, origin, hash });
        return Ok(());
    }
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                replace_inputs(item, format!("{at}[{i}]"), expected, sources, resolve)?;
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                replace_inputs(item, format!("{at}.{k}"), expected, sources, resolve)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn as_input(v: &Value) -> Option<Input> {
    let map = v.as_object()?;
    if map.len() != 1 {
        return None;
    }
    let (tag, value) = map.iter().next()?;
    let s = value.as_str()?;
    match tag.as_str() {
        "Node" => Some(Input::Node(s.to_string())),
        "File" => Some(Input::File(PathBuf::from(s))),
        _ => None,
    }
}

/// Content hashes of files, memoised by (path, size, mtime, inode).
#[derive(Debug, Default)]
pub struct FileHashMemo {
    entries: BTreeMap<PathBuf, MemoEntry>,
    dirty: bool,
    /// Bytes hashed by this memo since it was loaded (0 on a run that re-hashed nothing).
    pub hashed_bytes: u64,
}

/// What says a file is unchanged without reading it: size, modification time and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    size: u64,
    mtime_s: i64,
    mtime_ns: i64,
    inode: u64,
}

impl FileStamp {
    pub fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            size: meta.size(),
            mtime_s: meta.mtime(),
            mtime_ns: meta.mtime_nsec(),
            inode: meta.ino(),
        }
    }

    /// The file's stamp now (`None` if it is gone).
    pub fn read(path: &Path) -> Option<FileStamp> {
        fs::metadata(path).ok().map(|m| FileStamp::of(&m))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MemoEntry {
    #[serde(flatten)]
    stamp: FileStamp,
    hash: String,
}

impl MemoEntry {
    fn stat(meta: &fs::Metadata, hash: String) -> MemoEntry {
        MemoEntry {
            stamp: FileStamp::of(meta),
            hash,
        }
    }

    fn matches(&self, meta: &fs::Metadata) -> bool {
        self.stamp == FileStamp::of(meta)
    }
}

impl FileHashMemo {
    /// Loads the memo; a missing or unreadable memo file is an empty memo (it is a cache).
    pub fn load(path: &Path) -> FileHashMemo {
        let entries = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!("ignoring unreadable file-hash memo {}: {e}", path.display());
                BTreeMap::new()
            }),
            Err(_) => BTreeMap::new(),
        };
        FileHashMemo {
            entries,
            dirty: false,
            hashed_bytes: 0,
        }
    }

    /// Writes the memo back if it changed.
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&self.entries).map_err(io::Error::other)?;
        fsutil::write_atomic(path, &bytes)?;
        self.dirty = false;
        Ok(())
    }

    /// The content hash of a file: from the memo when its (size, mtime, inode) are unchanged,
    /// else by reading it.
    pub fn hash(&mut self, path: &Path) -> io::Result<String> {
        let meta = fs::metadata(path)?;
        if let Some(e) = self.entries.get(path)
            && e.matches(&meta)
        {
            return Ok(e.hash.clone());
        }
        let hash = fsutil::hash_file(path)?;
        self.hashed_bytes += meta.size();
        self.record(path, &meta, hash.clone());
        Ok(hash)
    }

    /// Records a hash computed elsewhere (e.g. of a file this process just wrote).
    pub fn record(&mut self, path: &Path, meta: &fs::Metadata, hash: String) {
        self.entries
            .insert(path.to_path_buf(), MemoEntry::stat(meta, hash));
        self.dirty = true;
    }

    /// The stamp `path` had when its hash was recorded (taken before it was read).
    pub fn stamp(&self, path: &Path) -> Option<FileStamp> {
        self.entries.get(path).map(|e| e.stamp)
    }

    /// The memoised hash of `path` if the file is unchanged since it was recorded.
    pub fn lookup(&self, path: &Path) -> Option<&str> {
        let meta = fs::metadata(path).ok()?;
        self.entries
            .get(path)
            .filter(|e| e.matches(&meta))
            .map(|e| e.hash.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slider_recipe::{DynamicMethod, MergeParams, Precision, RankRule, ResizeParams};

    fn merge(models: Vec<Input>, ratios: Vec<f64>) -> NodeParams {
        NodeParams::Merge(MergeParams {
            models,
            ratios,
            save_precision: Precision::Float,
        })
    }

    fn key(
        params: &NodeParams,
        version: u32,
        memo: &mut FileHashMemo,
        nodes: &BTreeMap<&str, &str>,
    ) -> String {
        fingerprint(params, version, |i| match i {
            Input::File(p) => Ok(Some(memo.hash(p).unwrap())),
            Input::Node(n) => Ok(nodes.get(n.as_str()).map(|h| h.to_string())),
        })
        .unwrap()
        .key
        .unwrap()
    }

    /// Every row of the module's table, as (change, does the key change?).
    #[test]
    fn the_key_table_holds() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        let b = dir.path().join("b.bin");
        fs::write(&a, b"lora a").unwrap();
        fs::write(&b, b"lora b").unwrap();
        let mut memo = FileHashMemo::default();
        let up: BTreeMap<&str, &str> = [("up", "11"), ("renamed_up", "11"), ("other", "22")].into();
        let base = merge(
            vec![Input::File(a.clone()), Input::Node("up".into())],
            vec![1.5, -1.5],
        );
        let k0 = key(&base, 1, &mut memo, &up);

        // moving a file with identical content
        let moved = dir.path().join("moved.bin");
        fs::copy(&a, &moved).unwrap();
        let moved_p = merge(
            vec![Input::File(moved.clone()), Input::Node("up".into())],
            vec![1.5, -1.5],
        );
        // touching a file
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let touched = key(&base, 1, &mut memo, &up);
        // renaming the upstream node (same output content)
        let renamed = merge(
            vec![Input::File(a.clone()), Input::Node("renamed_up".into())],
            vec![1.5, -1.5],
        );
        // a number written differently in the recipe: 1.5 / 1.50 / 15e-1
        let as_written = |ratios: &str| {
            let text = format!(
                "nodes:\n  up:\n    kind: merge\n    models: [{a}]\n    ratios: [1.0]\n  \
                 m:\n    kind: merge\n    models: [{a}, up]\n    ratios: {ratios}\n",
                a = a.display()
            );
            let plan = slider_recipe::load_str(&text, &dir.path().join("r.yaml"), &[]).unwrap();
            let node = plan.nodes.iter().find(|n| n.name == "m").unwrap();
            node.params.clone()
        };
        let spelled = as_written("[1.50, -15e-1]");
        assert_eq!(
            as_written("[1.5, -1.5]"),
            merge(
                vec![Input::File(a.clone()), Input::Node("up".into())],
                vec![1.5, -1.5],
            )
        );

        let cases: Vec<(&str, String, bool)> = vec![
            (
                "file moved, same content",
                key(&moved_p, 1, &mut memo, &up),
                false,
            ),
            ("file touched", touched, false),
            (
                "input node renamed, same output",
                key(&renamed, 1, &mut memo, &up),
                false,
            ),
            (
                "a number written differently",
                key(&spelled, 1, &mut memo, &up),
                false,
            ),
            (
                "param changed",
                key(
                    &merge(
                        vec![Input::File(a.clone()), Input::Node("up".into())],
                        vec![1.5, -1.0],
                    ),
                    1,
                    &mut memo,
                    &up,
                ),
                true,
            ),
            (
                "input file content changed",
                key(
                    &merge(
                        vec![Input::File(b.clone()), Input::Node("up".into())],
                        vec![1.5, -1.5],
                    ),
                    1,
                    &mut memo,
                    &up,
                ),
                true,
            ),
            (
                "input node output changed",
                key(
                    &merge(
                        vec![Input::File(a.clone()), Input::Node("other".into())],
                        vec![1.5, -1.5],
                    ),
                    1,
                    &mut memo,
                    &up,
                ),
                true,
            ),
            ("code version bumped", key(&base, 2, &mut memo, &up), true),
            (
                "inputs reordered",
                key(
                    &merge(
                        vec![Input::Node("up".into()), Input::File(a.clone())],
                        vec![1.5, -1.5],
                    ),
                    1,
                    &mut memo,
                    &up,
                ),
                true,
            ),
        ];
        for (what, k, changes) in cases {
            assert_eq!(k != k0, changes, "{what}");
        }
    }

    #[test]
    fn kind_enters_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        fs::write(&a, b"x").unwrap();
        let mut memo = FileHashMemo::default();
        let none = BTreeMap::new();
        let resize = NodeParams::Resize(ResizeParams {
            model: Input::File(a.clone()),
            new_rank: 4,
            new_conv_rank: 4,
            dynamic_method: None,
            dynamic_param: None,
            rank_rule: RankRule::default(),
            save_precision: Precision::Float,
        });
        let m = merge(vec![Input::File(a)], vec![4.0]);
        assert_ne!(
            key(&resize, 1, &mut memo, &none),
            key(&m, 1, &mut memo, &none)
        );
    }

    /// The default rank rule stays out of the document, so resize nodes written before the
    /// rule existed keep their keys; the other rule is a different node.
    #[test]
    fn only_a_chosen_rank_rule_enters_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        fs::write(&a, b"x").unwrap();
        let mut memo = FileHashMemo::default();
        let none = BTreeMap::new();
        let resize = |rank_rule| {
            NodeParams::Resize(ResizeParams {
                model: Input::File(a.clone()),
                new_rank: 4,
                new_conv_rank: 4,
                dynamic_method: Some(DynamicMethod::SvFro),
                dynamic_param: Some(0.9),
                rank_rule,
                save_precision: Precision::Float,
            })
        };
        let doc = fingerprint(&resize(RankRule::OnePastThreshold), 1, |_| Ok(None))
            .unwrap()
            .doc;
        assert!(!doc.to_string().contains("rank_rule"), "{doc}");
        assert_ne!(
            key(&resize(RankRule::OnePastThreshold), 1, &mut memo, &none),
            key(&resize(RankRule::ReachThreshold), 1, &mut memo, &none)
        );
    }

    /// The trainer rows: sd-scripts' commit and the trainer enter the key, the checkout's path
    /// and Python do not, and the burn trainer's code version does not concern sd-scripts.
    #[test]
    fn the_trainer_and_the_sd_scripts_commit_enter_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.bin");
        fs::write(&base, b"x").unwrap();
        let git = |repo: &Path, args: &[&str]| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(repo)
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}");
        };
        let (one, two) = (dir.path().join("one"), dir.path().join("two"));
        fs::create_dir_all(&one).unwrap();
        git(&one, &["init", "-q"]);
        git(&one, &["commit", "-q", "--allow-empty", "-m", "a"]);
        git(dir.path(), &["clone", "-q", "one", "two"]);
        let train = |trainer, checkout: &Path, python: &str| {
            let NodeParams::Train(mut p) = crate::test_plans::train(Input::File(base.clone()))
            else {
                unreachable!()
            };
            p.trainer = trainer;
            p.sd_scripts = (trainer == slider_recipe::Trainer::SdScripts).then(|| {
                slider_recipe::SdScriptsInstall {
                    checkout: checkout.to_path_buf(),
                    python: python.into(),
                }
            });
            NodeParams::Train(p)
        };
        let mut memo = FileHashMemo::default();
        let none = BTreeMap::new();
        let mut k = |p: &NodeParams, v: u32| key(p, v, &mut memo, &none);
        let sd = slider_recipe::Trainer::SdScripts;
        let burn = slider_recipe::Trainer::Burn;
        let at_one = k(&train(sd, &one, "python3"), 1);
        assert_ne!(k(&train(burn, &one, ""), 1), at_one, "the trainer");
        assert_eq!(
            k(&train(sd, &two, "/venv/bin/python"), 1),
            at_one,
            "path and Python"
        );
        assert_eq!(
            k(&train(sd, &one, "python3"), 7),
            at_one,
            "the burn trainer's version"
        );
        // A new commit in another clone (the commit is read once per checkout and process).
        git(&two, &["commit", "-q", "--allow-empty", "-m", "b"]);
        let other = dir.path().join("three");
        git(dir.path(), &["clone", "-q", "two", "three"]);
        assert_ne!(k(&train(sd, &other, "python3"), 1), at_one, "the commit");
        let doc = fingerprint(&train(burn, &one, ""), 1, |_| Ok(None))
            .unwrap()
            .doc;
        assert!(!doc.to_string().contains("trainer"), "{doc}");
    }

    #[test]
    fn numbers_and_key_order_are_canonical() {
        let cases = [
            (r#"{"b":1.0,"a":[2,-0.0]}"#, r#"{"a":[2,0],"b":1}"#),
            (
                r#"{"x":0.5,"y":{"d":1e3,"c":"s"}}"#,
                r#"{"x":0.5,"y":{"c":"s","d":1000}}"#,
            ),
        ];
        for (input, want) in cases {
            let mut v: Value = serde_json::from_str(input).unwrap();
            normalise_numbers(&mut v);
            let mut out = String::new();
            write_canonical(&v, &mut out);
            assert_eq!(out, want, "{input}");
        }
    }

    #[test]
    fn pending_inputs_give_no_key_but_a_document() {
        let fp = fingerprint(&merge(vec![Input::Node("up".into())], vec![1.0]), 1, |_| {
            Ok(None)
        })
        .unwrap();
        assert_eq!(fp.key, None);
        assert_eq!(fp.doc["params"]["models"][0], "pending");
        assert_eq!(fp.sources[0].at, "params.models[0]");
        assert_eq!(fp.sources[0].origin, InputOrigin::Node("up".into()));
    }

    #[test]
    fn memo_rehashes_only_when_stat_changes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.bin");
        fs::write(&a, b"first").unwrap();
        let memo_path = dir.path().join("memo.json");
        let mut memo = FileHashMemo::load(&memo_path);
        let h1 = memo.hash(&a).unwrap();
        memo.save(&memo_path).unwrap();

        let mut memo = FileHashMemo::load(&memo_path);
        assert_eq!(memo.hash(&a).unwrap(), h1);
        assert_eq!(memo.hashed_bytes, 0, "unchanged file is not re-read");

        fs::write(&a, b"second!").unwrap();
        let h2 = memo.hash(&a).unwrap();
        assert_ne!(h1, h2);
        assert_eq!(memo.hashed_bytes, 7);
    }
}

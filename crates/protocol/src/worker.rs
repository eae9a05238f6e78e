//! The worker protocol: JSON lines between the engine and a worker process
//! (`slider-run worker --device D`), one message per line on the worker's stdin (from the
//! engine) and stdout (to the engine); anything else goes to stderr.
//!
//! ```text
//! worker -> engine  {"type":"hello","kinds":["train"],"device":"cpu","version":"0.1.0",
//!                    "code_versions":{"train":2}}
//! engine -> worker  {"type":"run","node":"small_front","key":"…","kind":"train","params":{…},
//!                    "inputs":[{"input":{"File":"/…/a.png"},"path":"/…/a.png"}],
//!                    "work_dir":"/…/work/<key>","output_dir":"/…/tmp/<key>-…"}
//! worker -> engine  {"type":"progress","step":10,"total":400,"loss":0.12,"message":"…"}
//! worker -> engine  {"type":"result","outputs":[{"name":"lora","file":"lora.safetensors"}]}
//!                or {"type":"error","message":"…"}
//! engine -> worker  {"type":"shutdown"}            (or stdin closed: the worker exits)
//! ```
//! Output files are written inside `output_dir`; the first output is the primary one.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::params::{Input, NodeParams};

/// A message from a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMessage {
    Hello {
        kinds: Vec<String>,
        device: String,
        #[serde(default)]
        version: String,
        /// The code version of each kind this worker executes. Code versions are part of
        /// node keys, so a worker whose versions differ from the runner's is refused.
        #[serde(default)]
        code_versions: BTreeMap<String, u32>,
    },
    Progress(Progress),
    Result {
        outputs: Vec<WorkerOutput>,
    },
    Error {
        message: String,
    },
}

/// A progress report from a running node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One output file a worker wrote into `output_dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerOutput {
    pub name: String,
    pub file: String,
}

impl WorkerOutput {
    /// `(name, file)` pairs as outputs, in order (the first is the primary output).
    pub fn list(pairs: &[(&str, &str)]) -> Vec<WorkerOutput> {
        pairs
            .iter()
            .map(|(name, file)| WorkerOutput {
                name: (*name).into(),
                file: (*file).into(),
            })
            .collect()
    }
}

/// A message to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EngineMessage {
    Run(Box<Request>),
    Shutdown,
}

/// One node for a worker to execute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub node: String,
    pub key: String,
    pub kind: String,
    /// The node's typed parameters.
    pub params: NodeParams,
    /// Every input with the file holding its content.
    pub inputs: Vec<RequestInput>,
    /// Persistent across interrupted runs: checkpoints go here.
    pub work_dir: PathBuf,
    pub output_dir: PathBuf,
}

impl Request {
    /// The file holding an input's content (the engine sends one for every input).
    pub fn path_of(&self, input: &Input) -> Option<&Path> {
        self.inputs
            .iter()
            .find(|i| &i.input == input)
            .map(|i| i.path.as_path())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestInput {
    pub input: Input,
    pub path: PathBuf,
}

/// One JSON line of a message. Serialising our own types only fails on a bug (a map with
/// non-string keys, a non-finite float in a `Value`): that is an error for the caller to
/// report, never a different message.
pub fn to_line<T: Serialize>(msg: &T) -> std::io::Result<String> {
    serde_json::to_string(msg).map_err(std::io::Error::other)
}

/// The worker side of the protocol: says hello, then serves requests from `input` until it
/// closes or asks to shut down. `kinds` are the kinds served with their code versions;
/// `handler` runs one request (reporting progress through its callback) and returns the
/// output files or an error message.
pub fn serve(
    device: &str,
    kinds: &[(String, u32)],
    input: impl BufRead,
    mut output: impl Write,
    mut handler: impl FnMut(&Request, &mut dyn FnMut(Progress)) -> Result<Vec<WorkerOutput>, String>,
) -> std::io::Result<()> {
    let send = |out: &mut dyn Write, msg: &WorkerMessage| -> std::io::Result<()> {
        writeln!(out, "{}", to_line(msg)?)?;
        out.flush()
    };
    let names: Vec<String> = kinds.iter().map(|(k, _)| k.clone()).collect();
    send(
        &mut output,
        &WorkerMessage::Hello {
            kinds: names.clone(),
            device: device.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            code_versions: kinds.iter().cloned().collect(),
        },
    )?;
    for line in input.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<EngineMessage>(&line) {
            Ok(EngineMessage::Shutdown) => return Ok(()),
            Ok(EngineMessage::Run(req)) => {
                let result = if !names.contains(&req.kind) {
                    Err(format!(
                        "this build of slider-run's worker cannot run `{}` nodes (it supports: {})",
                        req.kind,
                        if names.is_empty() {
                            "nothing".to_string()
                        } else {
                            names.join(", ")
                        }
                    ))
                } else if req.kind != req.params.kind() {
                    Err(format!(
                        "request for a `{}` node carries `{}` parameters",
                        req.kind,
                        req.params.kind()
                    ))
                } else {
                    let out = &mut output;
                    // A failed progress write shows up again when the reply is sent.
                    let mut report = |p: Progress| {
                        let _ = send(out, &WorkerMessage::Progress(p));
                    };
                    handler(&req, &mut report)
                };
                match result {
                    Ok(outputs) => WorkerMessage::Result { outputs },
                    Err(message) => WorkerMessage::Error { message },
                }
            }
            Err(e) => WorkerMessage::Error {
                message: format!("malformed request: {e}"),
            },
        };
        send(&mut output, &reply)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::{MergeParams, Precision};

    fn request(node: &str, kind: &str, dir: &Path) -> Request {
        Request {
            node: node.into(),
            key: format!("key-{node}"),
            kind: kind.into(),
            params: NodeParams::Merge(MergeParams {
                models: vec![Input::Node("a".into())],
                ratios: vec![1.0],
                save_precision: Precision::Float,
            }),
            inputs: vec![RequestInput {
                input: Input::Node("a".into()),
                path: dir.join("a.safetensors"),
            }],
            work_dir: dir.to_path_buf(),
            output_dir: dir.to_path_buf(),
        }
    }

    #[test]
    fn messages_round_trip_as_json_lines() {
        let cases = [
            r#"{"type":"hello","kinds":["train"],"device":"cuda:0","version":"1","code_versions":{"train":2}}"#,
            r#"{"type":"progress","step":3,"total":10,"loss":0.25}"#,
            r#"{"type":"result","outputs":[{"name":"lora","file":"lora.safetensors"}]}"#,
            r#"{"type":"error","message":"out of memory"}"#,
        ];
        for line in cases {
            let msg: WorkerMessage = serde_json::from_str(line).unwrap();
            assert_eq!(to_line(&msg).unwrap(), line);
        }
        // A hello without versions (an older worker) still reads.
        let old: WorkerMessage =
            serde_json::from_str(r#"{"type":"hello","kinds":[],"device":"cpu"}"#).unwrap();
        assert!(
            matches!(old, WorkerMessage::Hello { code_versions, .. } if code_versions.is_empty())
        );
    }

    #[test]
    fn a_request_finds_the_file_of_each_input() {
        let dir = Path::new("/store/tmp");
        let req = request("n", "merge", dir);
        let line = to_line(&EngineMessage::Run(Box::new(req.clone()))).unwrap();
        let EngineMessage::Run(back) = serde_json::from_str(&line).unwrap() else {
            panic!("not a run message: {line}");
        };
        assert_eq!(*back, req);
        assert_eq!(
            back.path_of(&Input::Node("a".into())),
            Some(Path::new("/store/tmp/a.safetensors"))
        );
        assert_eq!(back.path_of(&Input::Node("b".into())), None);
    }

    #[test]
    fn serve_says_hello_answers_requests_and_refuses_what_it_cannot_run() {
        let dir = Path::new("/tmp/none");
        let run =
            |kind: &str| to_line(&EngineMessage::Run(Box::new(request("n", kind, dir)))).unwrap();
        let mut mismatched = request("n", "train", dir);
        mismatched.kind = "train".into();
        let input = format!(
            "{}\n{}\n{}\n{}\n{}\n",
            run("merge"),
            run("xy_plot"),
            to_line(&EngineMessage::Run(Box::new(mismatched))).unwrap(),
            "not json",
            to_line(&EngineMessage::Shutdown).unwrap()
        );
        let mut out = Vec::new();
        serve(
            "cpu",
            &[("merge".to_string(), 1), ("train".to_string(), 2)],
            input.as_bytes(),
            &mut out,
            |req, progress| {
                progress(Progress {
                    step: Some(1),
                    total: Some(1),
                    ..Progress::default()
                });
                Ok(WorkerOutput::list(&[(
                    "lora",
                    &format!("{}.safetensors", req.node),
                )]))
            },
        )
        .unwrap();
        let replies: Vec<WorkerMessage> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<&str> = replies
            .iter()
            .map(|m| match m {
                WorkerMessage::Hello { .. } => "hello",
                WorkerMessage::Progress(_) => "progress",
                WorkerMessage::Result { .. } => "result",
                WorkerMessage::Error { .. } => "error",
            })
            .collect();
        assert_eq!(
            kinds,
            ["hello", "progress", "result", "error", "error", "error"]
        );
        let WorkerMessage::Hello { code_versions, .. } = &replies[0] else {
            unreachable!()
        };
        assert_eq!(code_versions.get("train"), Some(&2));
        let messages: Vec<&str> = replies[3..]
            .iter()
            .map(|m| match m {
                WorkerMessage::Error { message } => message.as_str(),
                _ => "",
            })
            .collect();
        assert!(
            messages[0].contains("cannot run `xy_plot`"),
            "{}",
            messages[0]
        );
        assert!(
            messages[1].contains("carries `merge` parameters"),
            "{}",
            messages[1]
        );
        assert!(messages[2].contains("malformed request"), "{}", messages[2]);
    }
}

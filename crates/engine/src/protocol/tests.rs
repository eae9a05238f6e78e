//! The pool against a small worker written in sh that speaks the protocol: it reports
//! progress, writes its output, and exits (crashes) when asked to run a node named `crash`.

use std::fs;
use std::path::Path;
use std::sync::Mutex;

use super::*;

const TEST_WORKER: &str = r#"#!/bin/sh
here=$(dirname "$0")
echo start >> "$here/starts"
echo "{\"type\":\"hello\",\"kinds\":[\"train\"],\"device\":\"$2\",\"code_versions\":{\"train\":2}}"
while read -r line; do
  case "$line" in
    *'"type":"shutdown"'*) exit 0 ;;
    *'"node":"crash"'*) echo "dying on purpose" >&2; exit 3 ;;
  esac
  out=$(printf '%s' "$line" | sed -n 's/.*"output_dir":"\([^"]*\)".*/\1/p')
  echo '{"type":"progress","step":1,"total":2,"loss":0.5}'
  echo '{"type":"progress","step":2,"total":2,"message":"done"}'
  printf 'trained' > "$out/lora.safetensors"
  echo '{"type":"result","outputs":[{"name":"lora","file":"lora.safetensors"}]}'
done
"#;

fn request(node: &str, kind: &str, out: &Path) -> Request {
    Request {
        node: node.into(),
        key: format!("key-{node}"),
        kind: kind.into(),
        params: crate::test_plans::train(slider_recipe::Input::Node("base".into())),
        inputs: vec![],
        work_dir: out.to_path_buf(),
        output_dir: out.to_path_buf(),
    }
}

#[test]
fn pool_starts_feeds_reports_progress_and_restarts_a_crashed_worker() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("worker.sh");
    fs::write(&script, TEST_WORKER).unwrap();
    let pool = WorkerPool::new(
        vec!["sh".into(), script.display().to_string()],
        &["cpu".to_string()],
        dir.path().to_path_buf(),
        CancelToken::new(),
    );
    let out = dir.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let starts = || {
        fs::read_to_string(dir.path().join("starts"))
            .unwrap_or_default()
            .lines()
            .count()
    };

    // (node, kind, expected outcome, worker starts so far)
    let cases: [(&str, &str, Result<&str, &str>, usize); 4] = [
        ("first", "train", Ok("lora.safetensors"), 1),
        ("second", "train", Ok("lora.safetensors"), 1),
        ("crash", "train", Err("died"), 1),
        ("after_crash", "train", Ok("lora.safetensors"), 2),
    ];
    for (node, kind, want, want_starts) in cases {
        let seen = Mutex::new(Vec::new());
        let got = pool.run(request(node, kind, &out), 2, &|p| {
            seen.lock().unwrap().push(p)
        });
        match (got, want) {
            (Ok(outputs), Ok(file)) => {
                assert_eq!(outputs[0].file, file, "{node}");
                assert_eq!(fs::read_to_string(out.join(file)).unwrap(), "trained");
                let seen = seen.into_inner().unwrap();
                assert_eq!(seen.len(), 2, "{node}: two progress events");
                assert_eq!(
                    seen[0],
                    Progress {
                        step: Some(1),
                        total: Some(2),
                        loss: Some(0.5),
                        message: None
                    }
                );
            }
            (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{node}: {e}"),
            (got, want) => panic!("{node}: got {got:?}, want {want:?}"),
        }
        assert_eq!(starts(), want_starts, "{node}: worker starts");
    }
    let log = fs::read_to_string(dir.path().join("worker-cpu.log")).unwrap();
    assert!(
        log.contains("dying on purpose"),
        "worker stderr is logged: {log}"
    );

    let err = pool
        .run(request("plot", "xy_plot", &out), 1, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not support `xy_plot`"), "{err}");
}

#[test]
fn a_worker_of_another_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("worker.sh");
    fs::write(&script, TEST_WORKER).unwrap();
    let pool = WorkerPool::new(
        vec!["sh".into(), script.display().to_string()],
        &["cpu".to_string()],
        dir.path().to_path_buf(),
        CancelToken::new(),
    );
    let out = dir.path().join("out");
    fs::create_dir_all(&out).unwrap();
    // The worker says `train` is at version 2; this runner keys it at 3.
    let err = pool
        .run(request("n", "train", &out), 3, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("code version 2") && err.contains("version 3"),
        "{err}"
    );
    assert!(!out.join("lora.safetensors").exists(), "nothing ran");
}

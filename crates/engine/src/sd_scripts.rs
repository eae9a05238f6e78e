//! `trainer: sd-scripts`: `train` nodes trained by the user's kohya-ss/sd-scripts checkout,
//! run by the engine as a child program beside the burn worker. The node keeps everything
//! else of ours: its key (with the checkout's commit, see `fingerprint.rs`), the store, the
//! persistent work dir, the log, progress (parsed from the script's bar) and resume (from
//! kohya's `--save_state` folders, every `checkpoint_every` steps). The LoRA sd-scripts
//! writes is read back through `slider-lora` and checked (kohya names, the base model's
//! layout, finite values) before it is committed. Set-up: docs/sd-scripts.md.

mod args;
mod progress;
mod resume;
mod tokenizer;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use slider_lora::Lora;
use slider_lora::layout::UnetLayout;
use slider_recipe::{NodeParams, SdScriptsInstall, TrainParams, Trainer};

use crate::cancel::CancelToken;
use crate::child;
use crate::error::EngineError;
use crate::executor::{ExecError, Executor, Job, Placement, Produced, Progress};
use crate::lora_exec::LORA_FILE;

/// The code version of the sd-scripts executor (how it calls the scripts); the checkout's
/// commit enters the key beside it.
pub const SD_SCRIPTS_CODE_VERSION: u32 = 1;

/// Whether sd-scripts trains this node.
pub fn is_sd_scripts(params: &NodeParams) -> bool {
    matches!(params, NodeParams::Train(p) if p.trainer == Trainer::SdScripts)
}

/// What identifies the trainer of a node beyond its parameters: the sd-scripts checkout's
/// commit for `trainer: sd-scripts`, nothing for burn (whose code version is the kind's).
pub(crate) fn trainer_revision(params: &NodeParams) -> Result<Option<String>, EngineError> {
    let NodeParams::Train(p) = params else {
        return Ok(None);
    };
    if p.trainer != Trainer::SdScripts {
        return Ok(None);
    }
    let install = install_of(p).map_err(EngineError::Config)?;
    revision(&install.checkout)
        .map(Some)
        .map_err(EngineError::Config)
}

fn install_of(p: &TrainParams) -> Result<&SdScriptsInstall, String> {
    p.sd_scripts.as_ref().ok_or_else(|| {
        "a `trainer: sd-scripts` node without its checkout (the recipe resolves `sd_scripts`)"
            .to_string()
    })
}

/// `git rev-parse HEAD` of the checkout, once per checkout and process.
pub fn revision(checkout: &Path) -> Result<String, String> {
    static SEEN: OnceLock<Mutex<HashMap<PathBuf, String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if let Some(r) = seen.lock().ok().and_then(|m| m.get(checkout).cloned()) {
        return Ok(r);
    }
    let out = Command::new("git")
        .arg("-C")
        .arg(checkout)
        .args(["rev-parse", "HEAD"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run git to read the commit of {}: {e}",
                checkout.display()
            )
        })?;
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || commit.len() < 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(format!(
            "cannot read the commit of the sd-scripts checkout {} (`git rev-parse HEAD`: {}); \
             the node's key needs it: use a git clone of kohya-ss/sd-scripts",
            checkout.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if let Ok(mut m) = seen.lock() {
        m.insert(checkout.to_path_buf(), commit.clone());
    }
    Ok(commit)
}

/// Routes `train` nodes to their trainer: burn nodes to the worker (local or Slurm), the
/// others to [`SdScriptsExecutor`].
pub(crate) struct TrainDispatch {
    pub burn: Option<Arc<dyn Executor>>,
    pub sd_scripts: SdScriptsExecutor,
}

impl Executor for TrainDispatch {
    fn kind(&self) -> &str {
        "train"
    }

    fn code_version(&self) -> u32 {
        self.burn
            .as_ref()
            .map_or(SD_SCRIPTS_CODE_VERSION, |b| b.code_version())
    }

    fn placement(&self) -> Placement {
        Placement::Worker
    }

    fn checkpoints(&self) -> bool {
        true
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        if is_sd_scripts(job.params) {
            return self.sd_scripts.execute(job);
        }
        match &self.burn {
            Some(burn) => burn.execute(job),
            None => Err(ExecError::Failed(
                "no worker runs `train` in this run".into(),
            )),
        }
    }
}

/// Runs `train` nodes with sd-scripts, one per device at a time.
pub struct SdScriptsExecutor {
    devices: Devices,
}

impl SdScriptsExecutor {
    /// `devices` as given to `--devices` (`cpu`, `cuda:0`, ...). A device named twice is
    /// one here: PyTorch uses every core by itself, so two CPU workers mean one sd-scripts.
    pub fn new(devices: &[String]) -> SdScriptsExecutor {
        let mut distinct: Vec<String> = Vec::new();
        for d in devices {
            if !distinct.contains(d) {
                distinct.push(d.clone());
            }
        }
        SdScriptsExecutor {
            devices: Devices {
                free: Mutex::new(distinct),
                freed: Condvar::new(),
            },
        }
    }
}

impl Executor for SdScriptsExecutor {
    fn kind(&self) -> &str {
        "train"
    }

    fn code_version(&self) -> u32 {
        SD_SCRIPTS_CODE_VERSION
    }

    fn placement(&self) -> Placement {
        Placement::Worker
    }

    fn checkpoints(&self) -> bool {
        true
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        let NodeParams::Train(p) = job.params else {
            return Err(ExecError::Failed(format!(
                "`{}` is not a train node",
                job.node
            )));
        };
        let install = install_of(p).map_err(ExecError::Failed)?;
        let work = job.work_dir.unwrap_or(job.scratch_dir);
        let base = job.input_path(&p.base)?;
        let family = args::detect_family(base).map_err(ExecError::Failed)?;
        let commit = revision(&install.checkout).map_err(ExecError::Failed)?;

        let dataset = work.join("dataset");
        make_dir(&dataset)?;
        for (i, image) in p.images.iter().enumerate() {
            let src = job.input_path(image)?;
            let name = args::dataset_file(i, src);
            write(
                &dataset.join(name.with_extension("txt")),
                p.caption.as_bytes(),
            )?;
            slider_atomic::copy(src, &dataset.join(&name)).map_err(|e| io("copying", src, e))?;
        }
        let toml = work.join("dataset.toml");
        write(&toml, args::dataset_toml(p, &dataset).as_bytes())?;
        let tokenizers = work.join("tokenizers");
        tokenizer::write_tokenizer_cache(&tokenizers).map_err(ExecError::Failed)?;

        let max = p.max_train_steps as u64;
        let attempts = work.join("attempts");
        let state = resume::latest_state(&attempts, max);
        let start = state.as_ref().map_or(0, |s| s.step);
        let output_dir = resume::attempt_dir(&attempts, start);
        // Nothing in it is newer than `start` (it would have been resumed from).
        if output_dir.exists() {
            fs::remove_dir_all(&output_dir).map_err(|e| io("removing", &output_dir, e))?;
        }
        make_dir(&output_dir)?;
        let losses = Losses::open(&work.join("losses.csv"), start)?;

        let paths = args::Paths {
            base,
            dataset_toml: &toml,
            tokenizers: &tokenizers,
            output_dir: &output_dir,
            resume: state.as_ref().map(|s| (s.dir.as_path(), s.step)),
        };
        let script = install.checkout.join(family.script());
        let argv = args::arguments(p, &paths);
        match &state {
            Some(s) => job.log.line(&format!(
                "== sd-scripts {commit}: resuming at step {} from {}",
                s.step,
                s.dir.display()
            )),
            None => job
                .log
                .line(&format!("== sd-scripts {commit}: starting at step 0")),
        }
        job.log.line(&format!(
            "$ {} {} {}",
            install.python.display(),
            script.display(),
            argv.join(" ")
        ));

        let device = self.devices.take(job.cancel)?;
        let mut cmd = Command::new(&install.python);
        cmd.arg(&script)
            .args(&argv)
            .current_dir(work)
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .env("CUDA_VISIBLE_DEVICES", visible_devices(&device.name)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        child::detach_and_tie(&mut cmd);
        let mut proc = cmd.spawn().map_err(|e| {
            ExecError::Failed(format!(
                "cannot start sd-scripts' Python `{}`: {e} (set `sd_scripts_python` or \
                 {})",
                install.python.display(),
                slider_recipe::SD_SCRIPTS_PYTHON_ENV
            ))
        })?;
        let output = Output {
            job,
            start,
            max,
            losses: Mutex::new(losses),
            tail: Mutex::new(Vec::new()),
        };
        let (stdout, stderr) = (proc.stdout.take(), proc.stderr.take());
        let status = std::thread::scope(|scope| {
            if let Some(s) = stdout {
                scope.spawn(|| output.read(s));
            }
            if let Some(s) = stderr {
                scope.spawn(|| output.read(s));
            }
            child::wait_or_cancel(&mut proc, job.cancel)
        });
        drop(device);
        output.finish();
        let status =
            status.map_err(|e| ExecError::Failed(format!("waiting for sd-scripts: {e}")))?;
        let Some(status) = status else {
            return Err(ExecError::Cancelled);
        };
        if !status.success() {
            let tail = output
                .tail
                .lock()
                .map(|t| t.join(" | "))
                .unwrap_or_default();
            return Err(ExecError::Failed(format!(
                "sd-scripts' {} failed ({status}): {tail}",
                family.script()
            )));
        }

        let lora = output_dir.join(format!("{}.safetensors", args::OUTPUT_NAME));
        check_lora(&lora, family).map_err(ExecError::Failed)?;
        let target = job.out_dir.join(LORA_FILE);
        slider_atomic::copy(&lora, &target).map_err(|e| io("copying", &lora, e))?;
        let csv = output
            .losses
            .lock()
            .map_err(|_| ExecError::Failed("loss record poisoned".into()))?
            .csv();
        write(&job.out_dir.join("loss.csv"), csv.as_bytes())?;
        Ok(vec![
            Produced {
                name: "lora".into(),
                file: LORA_FILE.into(),
            },
            Produced {
                name: "loss".into(),
                file: "loss.csv".into(),
            },
        ])
    }
}

/// The script's output as it arrives: bar redraws become progress (and a log line per
/// step), other lines go to the node's log; the last few are kept for a failure message.
struct Output<'a, 'j> {
    job: &'a Job<'j>,
    start: u64,
    max: u64,
    losses: Mutex<Losses>,
    tail: Mutex<Vec<String>>,
}

impl Output<'_, '_> {
    fn read(&self, stream: impl Read) {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            // Split on `\n`, then each piece on `\r` (the bar redraws in place).
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    for segment in String::from_utf8_lossy(&buf).split(['\r', '\n']) {
                        self.segment(segment);
                    }
                }
            }
        }
    }

    fn segment(&self, segment: &str) {
        if segment.trim().is_empty() {
            return;
        }
        let Some(bar) = progress::parse_bar(segment) else {
            self.job.log.line(segment.trim_end());
            if let Ok(mut tail) = self.tail.lock() {
                tail.push(segment.trim().to_string());
                let excess = tail.len().saturating_sub(4);
                tail.drain(..excess);
            }
            return;
        };
        if bar.done == 0 {
            return;
        }
        // The bar shows a new step before its loss: the first redraw of step n carries the
        // loss of step n - 1 (or none), later redraws the step's own.
        let step = self.start + bar.done;
        let Ok(mut losses) = self.losses.lock() else {
            return;
        };
        let finished = losses.record(step, bar.avr_loss);
        drop(losses);
        if let Some((done, loss)) = finished {
            self.log_step(done, loss);
        }
        (self.job.progress)(Progress {
            step: Some(step),
            total: Some(self.max),
            loss: bar.avr_loss,
            message: None,
        });
    }

    fn log_step(&self, step: u64, loss: Option<f64>) {
        let loss = loss.map_or("-".into(), |l| l.to_string());
        self.job
            .log
            .line(&format!("step {step}/{} avr_loss={loss}", self.max));
    }

    /// Logs the last step (the others are logged when the next one starts).
    fn finish(&self) {
        let last = self.losses.lock().ok().and_then(|l| l.rows.last().copied());
        if let Some((step, loss)) = last.filter(|&(s, _)| s > self.start) {
            self.log_step(step, loss);
        }
    }
}

/// `(step, avr_loss)` of every step so far, kept in the work dir across attempts.
struct Losses {
    path: PathBuf,
    rows: Vec<(u64, Option<f64>)>,
}

impl Losses {
    /// The record of earlier attempts up to `start` (later rows are being redone).
    fn open(path: &Path, start: u64) -> Result<Losses, ExecError> {
        let text = fs::read_to_string(path).unwrap_or_default();
        let rows = text
            .lines()
            .filter_map(|l| {
                let (step, loss) = l.split_once(',')?;
                Some((step.parse().ok()?, loss.parse().ok()))
            })
            .filter(|&(step, _)| step <= start)
            .collect();
        let losses = Losses {
            path: path.to_path_buf(),
            rows,
        };
        losses.save()?;
        Ok(losses)
    }

    /// Records a redraw of the bar at `step`: a new row for a new step, the latest loss for
    /// the current one. Returns the step that a new one completes, with its loss.
    fn record(&mut self, step: u64, loss: Option<f64>) -> Option<(u64, Option<f64>)> {
        let finished = match self.rows.last_mut() {
            Some(last) if last.0 == step => {
                if loss.is_some() && last.1 != loss {
                    last.1 = loss;
                    // Losing the record costs only the loss curve, never the node.
                    let _ = self.save();
                }
                return None;
            }
            Some(last) if last.0 > step => return None,
            Some(last) => Some(*last),
            None => None,
        };
        self.rows.push((step, loss));
        let _ = self.save();
        finished
    }

    fn save(&self) -> Result<(), ExecError> {
        write(&self.path, self.csv().as_bytes())
    }

    /// `step,loss`: the columns the run report reads; a step without a loss is left blank.
    fn csv(&self) -> String {
        let mut csv = String::from("step,loss\n");
        for (step, loss) in &self.rows {
            let loss = loss.map_or(String::new(), |l| l.to_string());
            csv.push_str(&format!("{step},{loss}\n"));
        }
        csv
    }
}

/// The LoRA sd-scripts wrote, read through `slider-lora`: kohya names of the base model's
/// layout and finite values only.
fn check_lora(path: &Path, family: args::Family) -> Result<(), String> {
    let lora = Lora::load(path).map_err(|e| format!("sd-scripts' LoRA: {e}"))?;
    if lora.modules.is_empty() {
        return Err(format!(
            "sd-scripts' LoRA {} has no modules",
            path.display()
        ));
    }
    for (name, m) in &lora.modules {
        if !(name.starts_with("lora_unet_") || name.starts_with("lora_te")) {
            return Err(format!(
                "sd-scripts' LoRA has a module without a kohya name: `{name}`"
            ));
        }
        let finite = m.up.iter().chain(&m.down).all(|v| v.is_finite()) && m.alpha.is_finite();
        if !finite {
            return Err(format!(
                "sd-scripts' LoRA has values that are not finite in `{name}`"
            ));
        }
    }
    let layout = slider_lora::detect_layout(&lora);
    match layout.unet {
        Some(UnetLayout::Known(l)) if l == family.layout() => Ok(()),
        _ => Err(format!(
            "sd-scripts' LoRA {} is not laid out for the base model ({:?} expected, found {})",
            path.display(),
            family,
            layout.describe()
        )),
    }
}

/// The devices of the run; each sd-scripts node holds one while it trains.
struct Devices {
    free: Mutex<Vec<String>>,
    freed: Condvar,
}

struct Held<'a> {
    devices: &'a Devices,
    name: String,
}

impl Devices {
    fn take(&self, cancel: &CancelToken) -> Result<Held<'_>, ExecError> {
        let mut free = self
            .free
            .lock()
            .map_err(|_| ExecError::Failed("device list poisoned".into()))?;
        loop {
            if cancel.is_cancelled() {
                return Err(ExecError::Cancelled);
            }
            if let Some(name) = free.pop() {
                return Ok(Held {
                    devices: self,
                    name,
                });
            }
            free = self
                .freed
                .wait_timeout(free, Duration::from_millis(100))
                .map_err(|_| ExecError::Failed("device list poisoned".into()))?
                .0;
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Ok(mut free) = self.devices.free.lock() {
            free.push(std::mem::take(&mut self.name));
        }
        self.devices.freed.notify_one();
    }
}

/// `CUDA_VISIBLE_DEVICES` for a `--devices` entry: none for `cpu`, the index for `cuda:N`.
fn visible_devices(device: &str) -> Result<String, ExecError> {
    match device {
        "cpu" => Ok(String::new()),
        "cuda" => Ok("0".into()),
        d => match d.strip_prefix("cuda:") {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => Ok(n.into()),
            _ => Err(ExecError::Failed(format!(
                "sd-scripts runs on `cpu` or `cuda:N`, not on device `{d}`"
            ))),
        },
    }
}

fn make_dir(dir: &Path) -> Result<(), ExecError> {
    fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ExecError> {
    slider_atomic::write(path, bytes).map_err(|e| io("writing", path, e))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> ExecError {
    ExecError::Failed(format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_named_twice_trains_one_node_at_a_time() {
        let exec = SdScriptsExecutor::new(&["cpu".into(), "cpu".into()]);
        let cancel = CancelToken::new();
        let held = exec.devices.take(&cancel).unwrap();
        assert_eq!(held.name, "cpu");
        assert!(exec.devices.free.lock().unwrap().is_empty());
        drop(held);
        assert_eq!(*exec.devices.free.lock().unwrap(), ["cpu"]);
    }

    #[test]
    fn devices_map_to_cuda_visible_devices() {
        assert_eq!(visible_devices("cpu").unwrap(), "");
        assert_eq!(visible_devices("cuda:1").unwrap(), "1");
        assert!(visible_devices("wgpu:0").is_err());
        assert!(visible_devices("cuda:x").is_err());
    }

    #[test]
    fn losses_keep_the_earlier_attempts_up_to_the_resumed_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("losses.csv");
        let mut l = Losses::open(&path, 0).unwrap();
        assert_eq!(l.record(1, None), None);
        assert_eq!(l.record(1, Some(0.1)), None, "a redraw of the same step");
        for step in 2..=6 {
            // The first redraw of a step shows the loss of the one before.
            let before = Some((step - 1) as f64 / 10.0);
            assert_eq!(l.record(step, before), Some((step - 1, before)));
            assert_eq!(l.record(step, Some(step as f64 / 10.0)), None);
        }
        let l = Losses::open(&path, 4).unwrap();
        assert_eq!(l.csv(), "step,loss\n1,0.1\n2,0.2\n3,0.3\n4,0.4\n");
    }

    /// The key names the commit; a checkout that is not a git clone is refused by name.
    #[test]
    fn the_revision_is_the_checkouts_commit() {
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let ok = Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(ok, "git {args:?}");
        };
        let err = revision(dir.path()).unwrap_err();
        assert!(err.contains("git clone"), "{err}");
        git(&["init", "-q"]);
        git(&[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ]);
        let commit = revision(dir.path()).unwrap();
        assert_eq!(commit.len(), 40);
    }
}

//! `slider-run bench torch`: our training step, UNet forward, sampler step and attention
//! forward + backward next to the repo's PyTorch references (tests/fixtures/*_torch.py), back
//! to back in one run, each side in its own child process with a fixed thread count, printed
//! as one ratio table.
//!
//! Our side is this binary again (`--child ROW`, `RAYON_NUM_THREADS`), measured by
//! `slider_models::bench` and `slider_trainer::bench`; the PyTorch side is the row's script
//! (`BENCH_THREADS` -> `OMP_NUM_THREADS`, `torch.set_num_threads`). Both print one
//! `BENCH_RESULT {json}` line: each timed run's seconds, the UNet's parameters and input
//! shapes, the LoRA's module count, and the process's peak RSS.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use serde::{Deserialize, Serialize};
use slider_models::bench::{
    Runs, attention_seconds, median, peak_rss_mib, random_base, sampler_step_seconds,
    unet_forward_seconds, unet_parameters, with_one_layer_text,
};
use slider_models::burn::tensor::Device;
use slider_models::checkpoint::ModelSpec;
use slider_models::sample::{Generator, SampleJob, SamplerKind};
use slider_models::unet::UNetConfig;

/// The marker of a side's result line on its stdout.
const RESULT_MARKER: &str = "BENCH_RESULT ";

/// The fixture scripts where this binary was built (used when `tests/fixtures` is not under
/// the current directory).
const BUILT_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// Options of `bench torch` (flattened into `bench`'s arguments).
#[derive(Args, Debug, Clone)]
pub struct TorchArgs {
    /// `torch`: the Python with torch, diffusers and came_pytorch; without them only our side
    /// is measured.
    #[arg(
        long,
        value_name = "PATH",
        env = "SLIDER_BENCH_PYTHON",
        default_value = "python3"
    )]
    pub python: PathBuf,
    /// `torch`: thread counts to measure each row at (both sides).
    #[arg(
        long,
        value_name = "N,..",
        value_delimiter = ',',
        default_value = "1,2"
    )]
    pub threads: Vec<usize>,
    /// `torch`: the rows to measure [default: all].
    #[arg(long, value_enum, value_name = "ROW,..", value_delimiter = ',')]
    pub rows: Vec<Row>,
    /// `torch`: timed runs per measurement [default: 5 for the tiny rows, 2 for the SD1.5
    /// training step, 1 for the SD1.5 forward].
    #[arg(long, value_name = "N")]
    pub repeat: Option<usize>,
    /// `torch`: untimed warm-up runs before the timed ones (at least 1: the first run also
    /// loads the model).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub warmup: usize,
    /// `torch`: the folder of the PyTorch scripts [default: tests/fixtures, here or where
    /// this binary was built].
    #[arg(long, value_name = "DIR")]
    pub fixtures: Option<PathBuf>,
    /// Internal: measure our side of one row in this process and print its result line.
    #[arg(long, value_enum, hide = true)]
    pub child: Option<Row>,
    /// Internal: the folder for the children's random checkpoints and training runs.
    #[arg(long, hide = true)]
    pub scratch: Option<PathBuf>,
}

/// One row of the table: a measurement both sides make.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Row {
    /// Training step, tiny config, 32 px (16x16 latents: the default recipe's shape).
    #[value(name = "tiny-train-16")]
    TinyTrain16,
    /// Training step, tiny config, 64 px (32x32 latents).
    #[value(name = "tiny-train-32")]
    TinyTrain32,
    /// Training step, SD1.5, 256 px (32x32 latents).
    #[value(name = "sd15-train-256")]
    Sd15Train256,
    /// UNet forward, SD1.5, 512 px (64x64 latents), batch 1.
    #[value(name = "sd15-forward-512")]
    Sd15Forward512,
    /// One DPM++ 2M Karras sampler step, tiny config, 64 px (32x32 latents), CFG 7 (batch 2).
    TinySampleCfg,
    /// Attention forward + backward, SD1.5's first level at 256 px: 8 heads x 1024 tokens of
    /// 40 (ours: the UNet's memory-efficient op; PyTorch: scaled_dot_product_attention).
    #[value(name = "attention-1024")]
    Attention1024,
    /// The same at 512 px: 8 heads x 4096 tokens.
    #[value(name = "attention-4096")]
    Attention4096,
    /// The same, ours as burn's decomposed form (what autodiff runs for `module::attention`).
    #[value(name = "attention-4096-decomposed")]
    Attention4096Decomposed,
    /// Cross-attention at 512 px: 4096 queries, 77 keys (the caption), 8 heads of 40.
    #[value(name = "attention-cross-4096")]
    AttentionCross4096,
}

impl Row {
    const ALL: [Row; 9] = [
        Row::TinyTrain16,
        Row::TinyTrain32,
        Row::Sd15Train256,
        Row::Sd15Forward512,
        Row::TinySampleCfg,
        Row::Attention1024,
        Row::Attention4096,
        Row::Attention4096Decomposed,
        Row::AttentionCross4096,
    ];

    fn name(self) -> &'static str {
        match self {
            Row::TinyTrain16 => "tiny train step, 16x16",
            Row::TinyTrain32 => "tiny train step, 32x32",
            Row::Sd15Train256 => "SD1.5 train step, 256 px",
            Row::Sd15Forward512 => "SD1.5 UNet forward, 512 px",
            Row::TinySampleCfg => "tiny sampler step, CFG 7",
            Row::Attention1024 => "attention fwd+bwd, 8 x 1024 tokens",
            Row::Attention4096 => "attention fwd+bwd, 8 x 4096 tokens",
            Row::Attention4096Decomposed => "attention fwd+bwd, 8 x 4096, burn's decomposed form",
            Row::AttentionCross4096 => "cross-attention fwd+bwd, 8 x 4096 x 77",
        }
    }

    /// The attention rows' `(q, k and v)` shapes, `[batch, heads, tokens, head_dim]`.
    fn attention_shapes(self) -> Option<([usize; 4], [usize; 4])> {
        let tokens = |n| [1, 8, n, 40];
        match self {
            Row::Attention1024 => Some((tokens(1024), tokens(1024))),
            Row::Attention4096 | Row::Attention4096Decomposed => Some((tokens(4096), tokens(4096))),
            Row::AttentionCross4096 => Some((tokens(4096), tokens(77))),
            _ => None,
        }
    }

    fn default_repeat(self) -> usize {
        match self {
            Row::Sd15Train256 => 2,
            Row::Sd15Forward512 => 1,
            Row::Attention4096 | Row::Attention4096Decomposed | Row::AttentionCross4096 => 3,
            _ => 5,
        }
    }

    /// The PyTorch script and its arguments (thread count and runs added by the caller).
    fn torch_script(self, runs: Runs) -> (&'static str, Vec<String>) {
        let (w, r) = (runs.warmup.to_string(), runs.repeat.to_string());
        let train = |config: &str, px: &str| {
            let args = [px, &r, "CAME", "--config", config, "--warmup", &w];
            ("train_steps_torch.py", args.map(String::from).to_vec())
        };
        match self {
            Row::TinyTrain16 => train("tiny", "32"),
            Row::TinyTrain32 => train("tiny", "64"),
            Row::Sd15Train256 => train("sd15", "256"),
            Row::Sd15Forward512 => (
                "unet_forward_torch.py",
                ["sd15", &r, "--latent", "64", "--warmup", &w]
                    .map(String::from)
                    .to_vec(),
            ),
            Row::TinySampleCfg => (
                "sampler_step_torch.py",
                [
                    "--latent", "32", "--cfg", "7", "--warmup", &w, "--repeat", &r,
                ]
                .map(String::from)
                .to_vec(),
            ),
            Row::Attention1024
            | Row::Attention4096
            | Row::Attention4096Decomposed
            | Row::AttentionCross4096 => {
                let (q, kv) = self.attention_shapes().unwrap_or_default();
                let dims = |d: [usize; 4]| d.map(|x| x.to_string()).join(",");
                let args = [
                    "--q",
                    &dims(q),
                    "--kv",
                    &dims(kv),
                    "--warmup",
                    &w,
                    "--repeat",
                    &r,
                ];
                ("attention_torch.py", args.map(String::from).to_vec())
            }
        }
    }
}

/// What one side printed on its result line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    /// Seconds of each timed run.
    pub seconds: Vec<f64>,
    pub unet_params: usize,
    pub latent: Vec<usize>,
    pub context: Vec<usize>,
    pub lora_modules: Option<usize>,
    pub peak_rss_mib: Option<f64>,
}

impl Measured {
    /// The shapes both sides must agree on, as one line.
    fn shapes(&self) -> String {
        let dims = |d: &[usize]| d.iter().map(usize::to_string).collect::<Vec<_>>().join("x");
        if self.unet_params == 0 {
            // An attention row: no UNet, `latent` is q's shape and `context` k's and v's.
            return format!("q {}, k and v {}", dims(&self.latent), dims(&self.context));
        }
        let mut s = format!(
            "UNet {} params, latent {}, context {}",
            self.unet_params,
            dims(&self.latent),
            dims(&self.context)
        );
        if let Some(n) = self.lora_modules {
            let _ = write!(s, ", LoRA on {n} modules");
        }
        s
    }
}

/// One side of one measurement: its result, or why there is none.
type Side = std::result::Result<Measured, String>;

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Line {
    pub row: Row,
    pub threads: usize,
    pub ours: Side,
    /// `None`: the PyTorch side was not run (no torch).
    pub torch: Option<Side>,
}

pub fn run(args: &TorchArgs) -> Result<ExitCode> {
    if let Some(row) = args.child {
        return child(row, args);
    }
    let rows = if args.rows.is_empty() {
        Row::ALL.to_vec()
    } else {
        args.rows.clone()
    };
    if args.threads.contains(&0) {
        return Err(miette!("--threads: a thread count must be at least 1"));
    }
    let torch = probe_torch(&args.python, args.fixtures.as_deref());
    match &torch {
        Ok((version, dir)) => println!(
            "PyTorch side: {} ({version}), scripts in {}",
            args.python.display(),
            dir.display()
        ),
        Err(why) => println!("PyTorch not available ({why}): measuring our side only."),
    }
    let scratch = tempfile::Builder::new()
        .prefix("slider-bench-torch-")
        .tempdir()
        .into_diagnostic()
        .wrap_err("creating a scratch folder")?;
    let exe = std::env::current_exe().into_diagnostic()?;
    let sides = if torch.is_ok() { 2 } else { 1 };
    let bar = progress_bar((rows.len() * args.threads.len() * sides) as u64);
    let mut lines = Vec::new();
    for &row in &rows {
        let runs = Runs {
            warmup: args.warmup,
            repeat: args.repeat.unwrap_or(row.default_repeat()).max(1),
        };
        for &threads in &args.threads {
            let label = format!("{}, {threads} thread(s)", row.name());
            bar.set_message(format!("{label}, ours"));
            let mut ours_cmd = Command::new(&exe);
            ours_cmd
                .args(["bench", "torch", "--child", &row_value(row)])
                .args(["--warmup", &runs.warmup.to_string()])
                .args(["--repeat", &runs.repeat.to_string()])
                .arg("--scratch")
                .arg(scratch.path())
                .env("RAYON_NUM_THREADS", threads.to_string());
            let ours = measure(ours_cmd, &bar, &format!("{label}, ours"));
            bar.inc(1);
            let torch_side = torch.as_ref().ok().map(|(_, dir)| {
                let (script, script_args) = row.torch_script(runs);
                bar.set_message(format!("{label}, PyTorch"));
                let mut cmd = Command::new(&args.python);
                cmd.arg(dir.join(script))
                    .args(script_args)
                    .args(["--threads", &threads.to_string()])
                    .env("BENCH_THREADS", threads.to_string())
                    .env("OMP_NUM_THREADS", threads.to_string())
                    .env("MKL_NUM_THREADS", threads.to_string());
                let side = measure(cmd, &bar, &format!("{label}, PyTorch"));
                bar.inc(1);
                side
            });
            lines.push(Line {
                row,
                threads,
                ours,
                torch: torch_side,
            });
        }
    }
    bar.finish_and_clear();
    print!("{}", shapes_report(&lines));
    println!();
    print!("{}", table(&lines, torch.is_ok()));
    let failed = lines
        .iter()
        .any(|l| l.ours.is_err() || matches!(&l.torch, Some(Err(_))) || shapes_differ(l).is_some());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// clap's name of `row`.
fn row_value(row: Row) -> String {
    row.to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default()
}

/// The torch version and the scripts' folder, or why the PyTorch side cannot run.
fn probe_torch(
    python: &Path,
    fixtures: Option<&Path>,
) -> std::result::Result<(String, PathBuf), String> {
    let dir = match fixtures {
        Some(dir) => dir.to_path_buf(),
        None => [Path::new("tests/fixtures"), Path::new(BUILT_FIXTURES)]
            .into_iter()
            .find(|d| d.join("torch_bench.py").is_file())
            .map(Path::to_path_buf)
            .ok_or("the scripts (tests/fixtures/*_torch.py) are not found: pass --fixtures")?,
    };
    if !dir.join("torch_bench.py").is_file() {
        return Err(format!("{} has no torch_bench.py", dir.display()));
    }
    let probe = "import torch, diffusers; print(torch.__version__, diffusers.__version__)";
    let out = Command::new(python)
        .args(["-c", probe])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} does not run: {e}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").trim();
        return Err(format!(
            "{} cannot import torch and diffusers: {last}",
            python.display()
        ));
    }
    let versions = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let mut v = versions.split_whitespace();
    let version = match (v.next(), v.next()) {
        (Some(t), Some(d)) => format!("torch {t}, diffusers {d}"),
        _ => versions,
    };
    Ok((version, dir))
}

/// Runs one side to its end: its result line, or why there is none (the exit status and
/// the end of its stderr). Its stderr lines (one per run) become the bar's message.
fn measure(mut cmd: Command, bar: &ProgressBar, label: &str) -> Side {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut proc = cmd
        .spawn()
        .map_err(|e| format!("{:?} does not start: {e}", cmd.get_program()))?;
    let stderr = proc.stderr.take();
    let tail = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut tail: Vec<String> = Vec::new();
            for line in stderr.into_iter().flat_map(|e| BufReader::new(e).lines()) {
                let Ok(line) = line else { break };
                bar.set_message(format!("{label}: {}", line.trim()));
                tail.push(line);
                if tail.len() > 8 {
                    tail.remove(0);
                }
            }
            tail
        });
        let mut stdout = String::new();
        if let Some(mut out) = proc.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut stdout);
        }
        (reader.join().unwrap_or_default(), stdout)
    });
    let (tail, stdout) = tail;
    let status = proc.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("{status}: {}", tail.join(" | ")));
    }
    parse_result(&stdout)
}

/// The result line of a side's stdout.
fn parse_result(stdout: &str) -> Side {
    let line = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(RESULT_MARKER))
        .ok_or("no result line")?;
    let m: Measured = serde_json::from_str(line).map_err(|e| format!("bad result line: {e}"))?;
    if m.seconds.is_empty() {
        return Err("no timed runs".into());
    }
    Ok(m)
}

/// Our side of `row`, in this process (the parent set `RAYON_NUM_THREADS`).
fn child(row: Row, args: &TorchArgs) -> Result<ExitCode> {
    let runs = Runs {
        warmup: args.warmup,
        repeat: args.repeat.unwrap_or(row.default_repeat()).max(1),
    };
    let scratch = args
        .scratch
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("slider-bench-torch"));
    std::fs::create_dir_all(&scratch)
        .into_diagnostic()
        .wrap_err_with(|| format!("creating {}", scratch.display()))?;
    let each = |i: usize, secs: f64| eprintln!("run {i}: {secs:.3} s");
    let train = |spec: ModelSpec, name: &str, px: usize| -> Result<Measured> {
        let spec = with_one_layer_text(spec);
        let base = random_base(&scratch, name, &spec).map_err(|e| miette!("{e}"))?;
        let factor = vae_factor(&spec);
        let times = slider_trainer::bench::training_step_seconds(&base, px, runs, &scratch, each)
            .map_err(|e| miette!("{e}"))?;
        Ok(Measured {
            seconds: times.seconds,
            unet_params: unet_parameters(&spec),
            latent: vec![1, spec.unet.in_channels, px / factor, px / factor],
            context: vec![1, 77, spec.unet.context_dim],
            lora_modules: Some(times.lora_modules),
            peak_rss_mib: None,
        })
    };
    let attention = |tiled: bool| -> Measured {
        let (q, kv) = row.attention_shapes().unwrap_or_default();
        let seconds = attention_seconds(q, kv, tiled, runs, &Device::flex(), each);
        Measured {
            seconds,
            unet_params: 0,
            latent: q.to_vec(),
            context: kv.to_vec(),
            lora_modules: None,
            peak_rss_mib: None,
        }
    };
    let mut measured = match row {
        Row::Attention1024 | Row::Attention4096 | Row::AttentionCross4096 => attention(true),
        Row::Attention4096Decomposed => attention(false),
        Row::TinyTrain16 => train(ModelSpec::tiny(), "tiny", 32)?,
        Row::TinyTrain32 => train(ModelSpec::tiny(), "tiny", 64)?,
        Row::Sd15Train256 => train(ModelSpec::sd15(), "sd15", 256)?,
        Row::Sd15Forward512 => {
            let config = UNetConfig::sd15();
            let unet_params = unet_parameters(&ModelSpec::sd15());
            let seconds = unet_forward_seconds(&config, 64, runs, &Device::flex(), each);
            Measured {
                seconds,
                unet_params,
                latent: vec![1, config.in_channels, 64, 64],
                context: vec![1, 77, config.context_dim],
                lora_modules: None,
                peak_rss_mib: None,
            }
        }
        Row::TinySampleCfg => {
            let spec = with_one_layer_text(ModelSpec::tiny());
            let base = random_base(&scratch, "tiny", &spec).map_err(|e| miette!("{e}"))?;
            let generator = Generator::load(&base, &Device::flex()).map_err(|e| miette!("{e}"))?;
            let job = SampleJob {
                prompt: "a face".into(),
                negative_prompt: String::new(),
                seed: 1,
                steps: 0,
                cfg_scale: 7.0,
                sampler: SamplerKind::DpmPp2mKarras,
                width: 64,
                height: 64,
            };
            let seconds =
                sampler_step_seconds(&generator, &job, runs, each).map_err(|e| miette!("{e}"))?;
            let side = 64 / vae_factor(&spec);
            Measured {
                seconds,
                unet_params: unet_parameters(&spec),
                latent: vec![2, spec.unet.in_channels, side, side],
                context: vec![2, 77, spec.unet.context_dim],
                lora_modules: None,
                peak_rss_mib: None,
            }
        }
    };
    measured.peak_rss_mib = peak_rss_mib();
    let json = serde_json::to_string(&measured).into_diagnostic()?;
    println!("{RESULT_MARKER}{json}");
    Ok(ExitCode::SUCCESS)
}

/// The VAE's downsampling factor of `spec` (1 without a VAE).
fn vae_factor(spec: &ModelSpec) -> usize {
    1 << spec
        .vae
        .as_ref()
        .map_or(0, |v| v.ch_mult.len().saturating_sub(1))
}

/// Why the two sides of `line` did not measure the same thing, if they did not.
fn shapes_differ(line: &Line) -> Option<(String, String)> {
    match (&line.ours, &line.torch) {
        (Ok(a), Some(Ok(b))) if a.shapes() != b.shapes() => Some((a.shapes(), b.shapes())),
        _ => None,
    }
}

/// Each row's shapes on both sides, and whether they agree.
pub fn shapes_report(lines: &[Line]) -> String {
    let mut out = String::from("Shapes (ours | PyTorch):\n");
    for line in lines {
        let ours = match &line.ours {
            Ok(m) => m.shapes(),
            Err(_) => "failed".into(),
        };
        let torch = match &line.torch {
            None => "not run".into(),
            Some(Ok(m)) => m.shapes(),
            Some(Err(_)) => "failed".into(),
        };
        let verdict = match (&line.ours, &line.torch) {
            (Ok(_), Some(Ok(_))) if shapes_differ(line).is_some() => "DIFFER",
            (Ok(_), Some(Ok(_))) => "agree",
            _ => "-",
        };
        let _ = writeln!(
            out,
            "  {}, {} thread(s): {ours} | {torch}: {verdict}",
            line.row.name(),
            line.threads
        );
    }
    out
}

/// The ratio table (markdown): median seconds per op of each side, PyTorch / ours (> 1: we
/// are faster), peak RSS of each side's process; failures and the "no torch" case in notes
/// under it.
pub fn table(lines: &[Line], torch_available: bool) -> String {
    let secs = |side: &Side| match side {
        Ok(m) => median(&m.seconds).map_or("-".into(), |s| format!("{s:.3}")),
        Err(_) => "failed".into(),
    };
    let rss = |side: &Side| match side {
        Ok(m) => m.peak_rss_mib.map_or("-".into(), |r| format!("{r:.0}")),
        Err(_) => "-".into(),
    };
    let runs = |side: &Side| match side {
        Ok(m) => m.seconds.len().to_string(),
        Err(_) => "-".into(),
    };
    let mut out = String::new();
    out.push_str(
        "| row | threads | ours s/op | PyTorch s/op | PyTorch / ours | runs (ours, PyTorch) \
         | peak RSS ours MiB | peak RSS PyTorch MiB |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut notes = Vec::new();
    for line in lines {
        let not_run: Side = Err("not run".into());
        let torch = line.torch.as_ref().unwrap_or(&not_run);
        let ratio = match (&line.ours, torch) {
            (Ok(a), Ok(b)) => match (median(&a.seconds), median(&b.seconds)) {
                (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
                _ => "-".into(),
            },
            _ => "-".into(),
        };
        let ratio = if shapes_differ(line).is_some() {
            format!("{ratio} (shapes differ)")
        } else {
            ratio
        };
        let torch_secs = match &line.torch {
            None => "-".into(),
            Some(side) => secs(side),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {torch_secs} | {ratio} | {}, {} | {} | {} |",
            line.row.name(),
            line.threads,
            secs(&line.ours),
            runs(&line.ours),
            if line.torch.is_some() {
                runs(torch)
            } else {
                "-".into()
            },
            rss(&line.ours),
            if line.torch.is_some() {
                rss(torch)
            } else {
                "-".into()
            },
        );
        let label = format!("{}, {} thread(s)", line.row.name(), line.threads);
        if let Err(why) = &line.ours {
            notes.push(format!("{label}, ours failed: {why}"));
        }
        if let Some(Err(why)) = &line.torch {
            notes.push(format!("{label}, PyTorch failed: {why}"));
        }
    }
    if !torch_available {
        notes.push("PyTorch was not available: our side only.".into());
    }
    for note in notes {
        let _ = writeln!(out, "\n{note}");
    }
    out
}

/// A bar over the measurements on stderr, drawn only when stderr is a terminal.
fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.enable_steady_tick(Duration::from_millis(200));
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template("[{elapsed}] {pos}/{len} {msg}") {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(seconds: &[f64], latent: usize, rss: f64) -> Measured {
        Measured {
            seconds: seconds.to_vec(),
            unet_params: 6_826_244,
            latent: vec![1, 4, latent, latent],
            context: vec![1, 77, 768],
            lora_modules: Some(84),
            peak_rss_mib: Some(rss),
        }
    }

    #[test]
    fn the_table_gives_medians_and_pytorch_over_ours() {
        let lines = [
            Line {
                row: Row::TinyTrain16,
                threads: 1,
                ours: Ok(measured(&[0.5, 0.4, 9.0], 16, 300.4)),
                torch: Some(Ok(measured(&[1.0, 0.9, 0.8], 16, 900.0))),
            },
            Line {
                row: Row::TinyTrain32,
                threads: 2,
                ours: Ok(measured(&[2.0], 32, 310.0)),
                torch: Some(Ok(measured(&[1.0], 16, 910.0))),
            },
            Line {
                row: Row::Sd15Forward512,
                threads: 2,
                ours: Err("exit status: 1: out of memory".into()),
                torch: Some(Ok(measured(&[20.0], 64, 4000.0))),
            },
        ];
        let t = table(&lines, true);
        assert!(
            t.contains("| tiny train step, 16x16 | 1 | 0.500 | 0.900 | 1.80 | 3, 3 | 300 | 900 |"),
            "{t}"
        );
        assert!(t.contains("| 0.50 (shapes differ) |"), "{t}");
        assert!(t.contains("| failed | 20.000 | - |"), "{t}");
        assert!(
            t.contains("ours failed: exit status: 1: out of memory"),
            "{t}"
        );
        let shapes = shapes_report(&lines);
        assert!(shapes.contains("latent 1x4x16x16, context 1x77x768, LoRA on 84 modules | UNet"));
        assert!(
            shapes.contains(": agree\n") && shapes.contains(": DIFFER\n"),
            "{shapes}"
        );
    }

    #[test]
    fn without_torch_only_our_side_is_printed() {
        let err = probe_torch(Path::new("/nonexistent/python3"), None).unwrap_err();
        assert!(
            err.contains("does not run") || err.contains("not found"),
            "{err}"
        );
        let lines = [Line {
            row: Row::TinySampleCfg,
            threads: 1,
            ours: Ok(measured(&[0.25], 32, 200.0)),
            torch: None,
        }];
        let t = table(&lines, false);
        assert!(
            t.contains("| tiny sampler step, CFG 7 | 1 | 0.250 | - | - | 1, - | 200 | - |"),
            "{t}"
        );
        assert!(
            t.contains("PyTorch was not available: our side only."),
            "{t}"
        );
    }

    #[test]
    fn result_lines_are_read_from_the_end_of_stdout() {
        let out = "noise\nBENCH_RESULT {\"seconds\": [1.5], \"unet_params\": 5, \"latent\": [1], \
                   \"context\": [2], \"lora_modules\": null, \"threads\": 2, \"torch\": \"x\", \
                   \"peak_rss_mib\": 12.5}\n";
        let m = parse_result(out).unwrap();
        assert_eq!((m.seconds, m.peak_rss_mib), (vec![1.5], Some(12.5)));
        assert!(parse_result("nothing").is_err());
        assert!(parse_result("BENCH_RESULT {\"seconds\": []}").is_err());
    }

    #[test]
    fn every_row_has_a_script_and_a_clap_name() {
        let runs = Runs {
            warmup: 1,
            repeat: 2,
        };
        for row in Row::ALL {
            let (script, _) = row.torch_script(runs);
            assert!(Path::new(BUILT_FIXTURES).join(script).is_file(), "{script}");
            assert_eq!(Row::from_str(&row_value(row), true), Ok(row));
        }
    }
}

//! `svd-merge`, `merge`, `resize`, `convert`, `lint`, `inspect`, `bench lora|lora-flux` (and
//! the dispatch of `bench slurm`, in pipeline_cmd):
//! the LoRA tools standalone, with kohya-ss/sd-scripts' flag names (snake_case as kohya
//! spells them; kebab-case accepted).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use slider_lora::{
    DynamicMethod, Lora, ModuleResizeStats, Naming, Precision, RankRule, ResizeOptions,
    SvdMergeOptions, TensorDtype, inspect,
};

#[derive(Subcommand, Debug)]
pub enum LoraCommand {
    /// Merge LoRAs by SVD, as kohya's `networks/svd_merge_lora.py`, exactly and fast.
    ///
    /// delta = sum ratio_i * delta_i, re-factored to --new_rank (--new_conv_rank for 3x3
    /// convs) by an exact SVD of the stacked factors, then kohya's 0.99-quantile clamp
    /// (--no_clamp turns it off). alpha = rank. FLUX.1 / SD3.5 inputs in different layouts
    /// (kohya, diffusers, ComfyUI) are converted exactly to the first input's layout first.
    #[command(name = "svd-merge")]
    SvdMerge(SvdMergeArgs),
    /// Merge LoRAs exactly: the result's delta is sum ratio_i * delta_i.
    ///
    /// Ranks are concatenated (rank = sum of the inputs' ranks) with each ratio and
    /// alpha/rank folded into the factors, like kohya's `merge_lora.py --concat`. (Without
    /// --concat kohya adds the factors themselves, which is not a sum of deltas.) FLUX.1 /
    /// SD3.5 inputs in different layouts are converted exactly to the first input's layout.
    Merge(MergeArgs),
    /// Change a LoRA's rank, as kohya's `networks/resize_lora.py` (exact SVD always).
    ///
    /// With --dynamic_method the rank of each module is chosen from its singular values
    /// (at most --new_rank); alpha is rescaled so the kept delta is unchanged. The global
    /// --verbose prints kohya's per-module table and the Frobenius retention statistics.
    Resize(ResizeArgs),
    /// Convert a FLUX.1 / SD3.5 LoRA between the kohya, diffusers and ComfyUI layouts, exactly.
    ///
    /// Split to fused (diffusers' to_q/to_k/to_v into qkv): the fused up factor is
    /// block-diagonal, so the rank is the sum of the parts' ranks (kept when the parts share
    /// one down factor); the output lists those modules. Fused to split: each part keeps its
    /// rows of the up factor and the shared down. diffusers output has no alpha (folded into
    /// the up); kohya / ComfyUI output states alpha. Text-encoder modules are kept as they are.
    Convert(ConvertArgs),
    /// Check that a loader (ComfyUI, AUTOMATIC1111 or diffusers) reads every tensor of an
    /// SD1.x, SDXL, FLUX.1 or SD3.5 LoRA onto a layer of its model with the right shape.
    ///
    /// The loaders' rules are our reading of their public code (ComfyUI `comfy/lora.py`,
    /// A1111's Lora extension, diffusers' `lora_conversion_utils`). The model's layers come
    /// from the built-in architecture tables, or from --model CHECKPOINT's header. Each
    /// problem is named by its key; exits 1 when any tensor would be ignored or fail to load.
    /// Warnings (metadata read differently) do not fail. Tensors lint cannot check are listed.
    Lint(LintArgs),
    /// Show a LoRA's layout, modules, ranks, alphas, dtypes, metadata and delta norms.
    Inspect(InspectArgs),
    /// Benchmarks of the fast paths against the dense path kohya takes.
    Bench(Box<BenchArgs>),
}

#[derive(Args, Debug)]
pub struct SvdMergeArgs {
    /// LoRA files to merge.
    #[arg(long, num_args = 1.., required = true)]
    models: Vec<PathBuf>,
    /// One ratio per model (negative values subtract).
    #[arg(long, num_args = 1.., required = true, allow_negative_numbers = true)]
    ratios: Vec<f64>,
    /// Rank of linear and 1x1-conv modules.
    #[arg(long = "new_rank", visible_alias = "new-rank", default_value_t = 4)]
    new_rank: usize,
    /// Rank of 3x3-conv modules [default: --new_rank].
    #[arg(long = "new_conv_rank", visible_alias = "new-conv-rank")]
    new_conv_rank: Option<usize>,
    /// Output file.
    #[arg(long = "save_to", visible_alias = "save-to")]
    save_to: PathBuf,
    /// kohya's merge precision; computation is always f32/f64 here, so this only sets the
    /// default of --save_precision.
    #[arg(long, default_value = "float", value_parser = parse_precision)]
    precision: Precision,
    /// Precision of the saved weights: float, fp16 or bf16 [default: --precision].
    #[arg(long = "save_precision", visible_alias = "save-precision", value_parser = parse_precision)]
    save_precision: Option<Precision>,
    /// Quantile of kohya's clamp of the new factors.
    #[arg(
        long = "clamp_quantile",
        visible_alias = "clamp-quantile",
        default_value_t = 0.99
    )]
    clamp_quantile: f64,
    /// Keep the exact SVD factors (no clamp).
    #[arg(long = "no_clamp", visible_alias = "no-clamp")]
    no_clamp: bool,
}

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// LoRA files to merge.
    #[arg(long, num_args = 1.., required = true)]
    models: Vec<PathBuf>,
    /// One ratio per model (negative values subtract).
    #[arg(long, num_args = 1.., required = true, allow_negative_numbers = true)]
    ratios: Vec<f64>,
    /// Output file.
    #[arg(long = "save_to", visible_alias = "save-to")]
    save_to: PathBuf,
    /// Sets the default of --save_precision (computation is always f32).
    #[arg(long, default_value = "float", value_parser = parse_precision)]
    precision: Precision,
    /// Precision of the saved weights: float, fp16 or bf16 [default: --precision].
    #[arg(long = "save_precision", visible_alias = "save-precision", value_parser = parse_precision)]
    save_precision: Option<Precision>,
}

#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// The LoRA file to resize.
    #[arg(long)]
    model: PathBuf,
    /// Output file.
    #[arg(long = "save_to", visible_alias = "save-to")]
    save_to: PathBuf,
    /// New rank of linear modules (the maximum with --dynamic_method).
    #[arg(long = "new_rank", visible_alias = "new-rank", default_value_t = 4)]
    new_rank: usize,
    /// New rank of conv modules, 1x1 and 3x3 [default: --new_rank].
    #[arg(long = "new_conv_rank", visible_alias = "new-conv-rank")]
    new_conv_rank: Option<usize>,
    /// Precision of the saved weights and alphas: float, fp16 or bf16.
    #[arg(long = "save_precision", visible_alias = "save-precision", default_value = "float", value_parser = parse_precision)]
    save_precision: Precision,
    /// Choose each module's rank from its singular values.
    #[arg(long = "dynamic_method", visible_alias = "dynamic-method", value_enum)]
    dynamic_method: Option<DynamicName>,
    /// Target of the dynamic method (e.g. 0.75 for sv_fro).
    #[arg(long = "dynamic_param", visible_alias = "dynamic-param")]
    dynamic_param: Option<f64>,
    /// Which sd-scripts rank rule a dynamic resize reproduces: one-past-threshold (every
    /// release before PR #2194: one rank more than the first that reaches the target,
    /// never fewer than 2) or reach-threshold (after #2194: the first rank that reaches
    /// it, at least 1).
    #[arg(
        long = "rank_rule",
        visible_alias = "rank-rule",
        value_enum,
        default_value = "one-past-threshold"
    )]
    rank_rule: RankRuleName,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum RankRuleName {
    #[value(name = "one-past-threshold")]
    OnePastThreshold,
    #[value(name = "reach-threshold")]
    ReachThreshold,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The LoRA file to convert.
    file: PathBuf,
    /// The layout to write.
    #[arg(long, value_enum)]
    to: LayoutName,
    /// Output file.
    #[arg(long = "save_to", visible_alias = "save-to")]
    save_to: PathBuf,
    /// Precision of the saved weights: float, fp16 or bf16 [default: the input's].
    #[arg(long = "save_precision", visible_alias = "save-precision", value_parser = parse_precision)]
    save_precision: Option<Precision>,
}

#[derive(Args, Debug)]
pub struct LintArgs {
    /// The LoRA file.
    file: PathBuf,
    /// The loader whose reading to check.
    #[arg(long = "for", value_enum, default_value = "comfyui")]
    loader: LoaderName,
    /// The checkpoint the LoRA is for (a single-file SD1.x / SDXL checkpoint, or a FLUX.1 /
    /// SD3.5 transformer): its layers are read from its header instead of the built-in
    /// architecture tables. Only the header is read.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LoaderName {
    Comfyui,
    A1111,
    Diffusers,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LayoutName {
    Kohya,
    Diffusers,
    Comfyui,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DynamicName {
    #[value(name = "sv_ratio")]
    Ratio,
    #[value(name = "sv_fro")]
    Fro,
    #[value(name = "sv_cumulative")]
    Cumulative,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The LoRA file.
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to benchmark.
    #[arg(value_enum)]
    target: BenchTarget,
    /// `slurm`: the number of short command nodes.
    #[arg(long, default_value_t = 60)]
    pub nodes: usize,
    /// `slurm`: where the benchmark's recipe and stores go; the cluster's nodes must see it
    /// [default: a new folder in the current directory]. `train`: where the random
    /// checkpoint and the work dirs go, kept afterwards [default: a temporary folder].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// `slurm`: a cluster profile [default: the single-node test cluster's: the store may be
    /// local, 0.5 s polls].
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// `slurm`: jobs in flight at once [default: the profile's `max_jobs`, else 8].
    #[arg(long, value_name = "N")]
    pub max_jobs: Option<usize>,
    #[command(flatten)]
    pub torch: crate::bench_torch::TorchArgs,
    #[command(flatten)]
    pub train: crate::bench_train::TrainArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BenchTarget {
    /// The method's merge chain on synthetic SDXL LoRAs, fast path vs dense path.
    Lora,
    /// A FLUX.1 pair merge (kohya + diffusers inputs) and an sv_fro resize, fast vs dense.
    LoraFlux,
    /// Slurm's cost per job (submit, queue, run, notice) and a recipe of short command
    /// nodes through Slurm against the same recipe run locally (needs a cluster).
    Slurm,
    /// Our training step, UNet forward, sampler step and attention forward + backward against
    /// the repo's PyTorch scripts (tests/fixtures/*_torch.py), at 1 and 2 threads, as one
    /// ratio table.
    Torch,
    /// Seconds per training step and peak memory of one configuration (`--model`,
    /// `--resolution`, `--gradient-checkpointing`) next to the plain one, on a random
    /// full-size checkpoint.
    Train,
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse().map_err(|e: slider_lora::LoraError| e.to_string())
}

pub fn run(cmd: LoraCommand, verbose: bool) -> Result<ExitCode> {
    match cmd {
        LoraCommand::SvdMerge(args) => svd_merge(args),
        LoraCommand::Merge(args) => merge(args),
        LoraCommand::Resize(args) => resize(args, verbose),
        LoraCommand::Convert(args) => convert(args),
        LoraCommand::Lint(args) => lint(args),
        LoraCommand::Inspect(args) => inspect(args),
        LoraCommand::Bench(args) => match args.target {
            BenchTarget::Lora => bench_lora(),
            BenchTarget::LoraFlux => bench_lora_flux(),
            BenchTarget::Slurm => crate::pipeline_cmd::bench_slurm(&args),
            BenchTarget::Torch => crate::bench_torch::run(&args.torch),
            BenchTarget::Train => crate::bench_train::run(&args.train, args.dir.as_deref())
                .map_err(|e| miette!("{e:#}")),
        },
    }
}

/// A spinner on stderr, drawn only when stderr is a terminal.
pub(crate) fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.enable_steady_tick(Duration::from_millis(120));
    } else {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.set_message(message.to_string());
    bar
}

fn load_all(paths: &[PathBuf], bar: &ProgressBar) -> Result<Vec<Lora>> {
    paths
        .iter()
        .map(|p| {
            bar.set_message(format!("reading {}", p.display()));
            Lora::load(p).map_err(|e| miette!("{e}"))
        })
        .collect()
}

fn save(lora: &Lora, path: &Path, precision: Precision, bar: &ProgressBar) -> Result<()> {
    bar.set_message(format!("writing {}", path.display()));
    lora.save(path, precision).map_err(|e| miette!("{e}"))?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} modules, {precision})",
        path.display(),
        lora.modules.len()
    );
    Ok(())
}

fn svd_merge(args: SvdMergeArgs) -> Result<ExitCode> {
    let bar = spinner("svd-merge");
    let loras = load_all(&args.models, &bar)?;
    let refs: Vec<&Lora> = loras.iter().collect();
    let opts = SvdMergeOptions {
        new_rank: args.new_rank,
        new_conv_rank: args.new_conv_rank.unwrap_or(args.new_rank),
        clamp_quantile: (!args.no_clamp).then_some(args.clamp_quantile),
    };
    bar.set_message("merging");
    let merged = slider_lora::svd_merge(&refs, &args.ratios, &opts).map_err(|e| miette!("{e}"))?;
    tracing::info!(modules = merged.modules.len(), "svd-merged");
    let precision = args.save_precision.unwrap_or(args.precision);
    save(&merged, &args.save_to, precision, &bar)?;
    Ok(ExitCode::SUCCESS)
}

fn merge(args: MergeArgs) -> Result<ExitCode> {
    let bar = spinner("merge");
    let loras = load_all(&args.models, &bar)?;
    let refs: Vec<&Lora> = loras.iter().collect();
    bar.set_message("merging");
    let merged = slider_lora::merge(&refs, &args.ratios).map_err(|e| miette!("{e}"))?;
    let precision = args.save_precision.unwrap_or(args.precision);
    save(&merged, &args.save_to, precision, &bar)?;
    Ok(ExitCode::SUCCESS)
}

fn resize(args: ResizeArgs, verbose: bool) -> Result<ExitCode> {
    let dynamic = match (args.dynamic_method, args.dynamic_param) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(miette!(
                "--dynamic_method needs --dynamic_param (e.g. --dynamic_param 0.75 for sv_fro)"
            ));
        }
        (Some(DynamicName::Ratio), Some(p)) => Some(DynamicMethod::SvRatio(p)),
        (Some(DynamicName::Fro), Some(p)) => Some(DynamicMethod::SvFro(p)),
        (Some(DynamicName::Cumulative), Some(p)) => Some(DynamicMethod::SvCumulative(p)),
    };
    let bar = spinner("resize");
    let lora = load_all(std::slice::from_ref(&args.model), &bar)?
        .pop()
        .ok_or_else(|| miette!("nothing loaded"))?;
    let opts = ResizeOptions {
        new_rank: args.new_rank,
        new_conv_rank: args.new_conv_rank.unwrap_or(args.new_rank),
        dynamic,
    };
    let rule = match args.rank_rule {
        RankRuleName::OnePastThreshold => RankRule::OnePastThreshold,
        RankRuleName::ReachThreshold => RankRule::ReachThreshold,
    };
    bar.set_message("resizing");
    let (resized, stats) =
        slider_lora::resize_by_rule(&lora, &opts, rule).map_err(|e| miette!("{e}"))?;
    if verbose {
        bar.suspend(|| print_resize_table(&stats, dynamic.is_some()));
    }
    save(&resized, &args.save_to, args.save_precision, &bar)?;
    Ok(ExitCode::SUCCESS)
}

/// kohya's `--verbose` output of `resize_lora.py`.
fn print_resize_table(stats: &[ModuleResizeStats], dynamic: bool) {
    let pct = |x: f64| format!("{:.1}%", x * 100.0);
    for s in stats {
        let mut line = format!(
            "{:75} | sum(S) retained: {}, fro retained: {}, max(S) ratio: {:.1}",
            s.name,
            pct(s.sum_retained),
            pct(s.fro_retained),
            s.max_ratio
        );
        if dynamic {
            line.push_str(&format!(
                ", dynamic | dim: {}, alpha: {}",
                s.new_rank,
                python_float(f64::from(s.new_alpha))
            ));
        }
        println!("{line}");
    }
    let fro: Vec<f64> = stats
        .iter()
        .map(|s| s.fro_retained)
        .filter(|x| !x.is_nan())
        .collect();
    let n = fro.len().max(1) as f64;
    let mean = fro.iter().sum::<f64>() / n;
    let std = (fro.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    println!(
        "Average Frobenius norm retention: {:.2}% | std: {std:.3}",
        mean * 100.0
    );
}

/// Python's `str(float)` for the values kohya prints (alphas): `.0` on integers.
fn python_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn convert(args: ConvertArgs) -> Result<ExitCode> {
    let bar = spinner(&format!("reading {}", args.file.display()));
    let lora = Lora::load(&args.file).map_err(|e| miette!("{e}"))?;
    let to = match args.to {
        LayoutName::Kohya => Naming::Kohya,
        LayoutName::Diffusers => Naming::Diffusers,
        LayoutName::Comfyui => Naming::ComfyUi,
    };
    bar.set_message("converting");
    let (converted, report) = slider_lora::convert(&lora, to).map_err(|e| miette!("{e}"))?;
    let precision = args
        .save_precision
        .unwrap_or_else(|| input_precision(&lora));
    bar.suspend(|| {
        for line in report.lines() {
            println!("{line}");
        }
    });
    save(&converted, &args.save_to, precision, &bar)?;
    Ok(ExitCode::SUCCESS)
}

fn lint(args: LintArgs) -> Result<ExitCode> {
    let bytes = std::fs::read(&args.file)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot read `{}`", args.file.display()))?;
    let loader = match args.loader {
        LoaderName::Comfyui => slider_lora::lint::Loader::ComfyUi,
        LoaderName::A1111 => slider_lora::lint::Loader::A1111,
        LoaderName::Diffusers => slider_lora::lint::Loader::Diffusers,
    };
    let model = args
        .model
        .as_deref()
        .map(slider_lora::lint::ModelLayers::from_checkpoint)
        .transpose()
        .map_err(|e| miette!("{e}"))?;
    let report = slider_lora::lint::lint(&args.file, &bytes, loader, model.as_ref())
        .map_err(|e| miette!("{e}"))?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).into_diagnostic()?;
        println!("{text}");
    } else {
        println!(
            "{}: {} LoRA, {} modules loaded by {}, {} problems, {} text-encoder tensors not \
             checked",
            args.file.display(),
            report.layout,
            report.loaded_modules,
            report.loader,
            report.problems.len(),
            report.unchecked.len()
        );
        println!("  layers from {}", report.model);
        for p in &report.problems {
            println!("  {}: {}", p.key, p.problem);
        }
        for w in &report.warnings {
            println!("  warning: {}: {}", w.key, w.problem);
        }
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The precision a converted file keeps: the input's, when all its weights share one.
fn input_precision(lora: &Lora) -> Precision {
    let mut dtypes = lora.modules.values().map(|m| m.dtype);
    match dtypes.next() {
        Some(first) if dtypes.all(|d| d == first) => match first {
            TensorDtype::F16 => Precision::F16,
            TensorDtype::Bf16 => Precision::Bf16,
            TensorDtype::F32 => Precision::F32,
        },
        _ => Precision::F32,
    }
}

fn inspect(args: InspectArgs) -> Result<ExitCode> {
    let bar = spinner(&format!("reading {}", args.file.display()));
    let lora = Lora::load(&args.file).map_err(|e| miette!("{e}"))?;
    bar.set_message("computing delta norms");
    let summary = inspect::summarize(&lora);
    bar.finish_and_clear();
    if args.json {
        let mut value = serde_json::to_value(&summary).into_diagnostic()?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert(
                "file".into(),
                serde_json::Value::String(args.file.display().to_string()),
            );
        }
        let text = serde_json::to_string_pretty(&value)
            .into_diagnostic()
            .wrap_err("serialising the summary")?;
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let counts = |m: &std::collections::BTreeMap<String, usize>| {
        m.iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("file:     {}", args.file.display());
    let te = if summary.text_encoders.is_empty() {
        String::new()
    } else {
        format!(" + text encoders {}", summary.text_encoders.join(", "))
    };
    let naming = summary
        .naming
        .as_ref()
        .map(|n| format!(" ({n} names)"))
        .unwrap_or_default();
    println!("layout:   {}{naming}{te}", summary.layout);
    println!(
        "modules:  {} ({})",
        summary.module_count,
        counts(&summary.kinds)
    );
    let ranks: std::collections::BTreeMap<String, usize> = summary
        .ranks
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect();
    println!("ranks:    {}", counts(&ranks));
    println!("alphas:   {}", counts(&summary.alphas));
    println!("dtypes:   {}", counts(&summary.dtypes));
    println!("metadata: {} keys", summary.metadata.len());
    for (k, v) in &summary.metadata {
        let shown: String = v.chars().take(120).collect();
        let more = if v.chars().count() > 120 { "…" } else { "" };
        println!("  {k} = {shown}{more}");
    }
    println!();
    println!(
        "{:<80} {:<8} {:>12} {:>5} {:>8} {:>12}",
        "module", "kind", "out x in", "rank", "alpha", "|delta|_F"
    );
    for m in &summary.modules {
        println!(
            "{:<80} {:<8} {:>12} {:>5} {:>8} {:>12.6}",
            m.name,
            m.kind,
            format!("{}x{}", m.out_dim, m.in_dim),
            m.rank,
            m.alpha,
            m.delta_norm
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_lora() -> Result<ExitCode> {
    let bar = spinner("bench lora");
    let rows = slider_lora::bench::run_lora_bench(&mut |step: &str| {
        tracing::info!("{step}");
        bar.set_message(step.to_string());
    })
    .map_err(|e| miette!("{e}"))?;
    bar.finish_and_clear();
    print_bench_table(&rows);
    if let Some(first) = rows.first() {
        println!(
            "\n{} modules per LoRA (SDXL layout, rank 4, alpha 1). Dense path (kohya's: full \
             out x in f32 delta, thin SVD) timed on one module per shape class \
             ({} classes) and extrapolated by class size; fast path timed on every module.",
            first.modules, first.dense_modules_timed
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_lora_flux() -> Result<ExitCode> {
    let bar = spinner("bench lora-flux");
    let rows = slider_lora::bench::run_flux_bench(&mut |step: &str| {
        tracing::info!("{step}");
        bar.set_message(step.to_string());
    })
    .map_err(|e| miette!("{e}"))?;
    bar.finish_and_clear();
    print_bench_table(&rows);
    if let Some(first) = rows.first() {
        println!(
            "\n{} layers per LoRA (FLUX.1, rank 16, alpha 16; the second input in diffusers \
             names, converted by the merge). Dense path (kohya's: full out x in f32 delta, \
             thin SVD) timed on one layer per shape class ({} classes) and extrapolated by \
             class size; fast path timed on every layer.",
            first.modules, first.dense_modules_timed
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_bench_table(rows: &[slider_lora::bench::BenchRow]) {
    println!(
        "| {:<44} | {:>13} | {:>14} | {:>7} |",
        "operation", "fast path (s)", "dense path (s)", "ratio"
    );
    println!("|{:-<46}|{:->15}|{:->16}|{:->9}|", "", "", "", "");
    for r in rows {
        println!(
            "| {:<44} | {:>13.3} | {:>14.1} | {:>6.0}x |",
            r.operation,
            r.fast.as_secs_f64(),
            r.dense.as_secs_f64(),
            r.ratio()
        );
    }
}

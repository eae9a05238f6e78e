//! `model inspect` and `model forward`: base checkpoints, for users and parity checks.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use miette::{IntoDiagnostic, WrapErr};
use slider_models::forward::{read_tensors, write_tensors};
use slider_models::weights::TensorSource;
use slider_models::{
    BaseConfig, Checkpoint, ModelSpec, StableDiffusion, check_keys, check_values, open_device,
};

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Show a checkpoint's detected architecture, parameter counts, dtypes and any missing or
    /// unexpected keys. Exits 1 when the checkpoint would not load.
    Inspect {
        /// A single-file `.safetensors` checkpoint (original SD1.x/SDXL layout).
        checkpoint: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Check names, shapes and dtypes only; by default every value is also read once and
        /// checked to be finite.
        #[arg(long)]
        headers_only: bool,
        /// The model's diffusers `config.json` (UNet), or a folder laid out like a diffusers
        /// repository (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`): what the
        /// checkpoint's shapes cannot tell (GroupNorm groups, attention heads). Values the
        /// weights contradict are an error.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
    /// Run the model parts that the input tensors' names call for and write their outputs.
    /// Names (diffusers' argument names): `sample`+`timestep`+`encoder_hidden_states`
    /// (+`text_embeds`+`time_ids` for SDXL) -> UNet `noise_pred`; `input_ids`/`input_ids_2` ->
    /// text encoders; `image` -> VAE `latent_mean`/`latent_logvar`; `latents` -> `decoded`.
    /// See docs/models.md.
    Forward {
        /// A single-file `.safetensors` checkpoint.
        checkpoint: PathBuf,
        /// Input tensors by name (safetensors; f32, f16, bf16 or integer ids).
        #[arg(long)]
        inputs: PathBuf,
        /// Where to write the outputs (safetensors, f32).
        #[arg(long)]
        out: PathBuf,
        /// Compute device: `cpu`, `wgpu:N` or `cuda:N` (GPU builds only).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The model's diffusers `config.json` (UNet), or a folder laid out like a diffusers
        /// repository (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`): what the
        /// checkpoint's shapes cannot tell (GroupNorm groups, attention heads). Values the
        /// weights contradict are an error.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

pub fn run(cmd: ModelCommand) -> miette::Result<ExitCode> {
    match cmd {
        ModelCommand::Inspect {
            checkpoint,
            json,
            headers_only,
            config,
        } => inspect(
            &checkpoint,
            json,
            !headers_only,
            &base_config(config.as_deref())?,
        ),
        ModelCommand::Forward {
            checkpoint,
            inputs,
            out,
            device,
            config,
        } => forward(
            &checkpoint,
            &inputs,
            &out,
            &device,
            &base_config(config.as_deref())?,
        ),
    }
}

/// The `--config` of a command, read and checked; none when absent.
pub fn base_config(path: Option<&Path>) -> miette::Result<BaseConfig> {
    match path {
        Some(p) => BaseConfig::load(p).into_diagnostic(),
        None => Ok(BaseConfig::none()),
    }
}

fn inspect(path: &Path, json: bool, values: bool, config: &BaseConfig) -> miette::Result<ExitCode> {
    let ckpt = Checkpoint::open(path).into_diagnostic()?;
    let spec = ModelSpec::detect_with(&ckpt, config).into_diagnostic()?;
    let assumed = spec.assumptions(&ckpt, config);
    let mut report = check_keys(&ckpt, &spec);
    if values {
        let spinner = spinner("reading every value");
        check_values(&ckpt, &spec, &mut report);
        spinner.finish_and_clear();
    }

    let prefixes = spec.part_prefixes();
    let mut parts: Vec<serde_json::Value> = Vec::new();
    for (part, prefix) in &prefixes {
        let mut params = 0usize;
        let mut tensors = 0usize;
        let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
        for key in ckpt.keys().filter(|k| k.starts_with(prefix)) {
            tensors += 1;
            params += ckpt
                .shape_of(key)
                .map(|s| s.iter().product::<usize>())
                .unwrap_or(0);
            *dtypes
                .entry(ckpt.dtype(key).unwrap_or_default())
                .or_default() += 1;
        }
        parts.push(serde_json::json!({
            "part": part, "prefix": prefix, "parameters": params, "tensors": tensors, "dtypes": dtypes,
        }));
    }
    let other: Vec<&str> = ckpt
        .keys()
        .filter(|k| !prefixes.iter().any(|(_, p)| k.starts_with(p)))
        .collect();

    if json {
        let value = serde_json::json!({
            "checkpoint": path,
            "architecture": spec.name(),
            "spec": spec,
            "scaling_factor": spec.family.scaling_factor(),
            "configs": slider_models::diffusers_config::describe(config),
            "assumed": assumed,
            "parts": parts,
            "other_keys": other,
            "keys": report,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).into_diagnostic()?
        );
    } else {
        println!("checkpoint    {}", path.display());
        println!("architecture  {} ({:?} family)", spec.name(), spec.family);
        println!(
            "unet          channels {} x {:?}, res blocks {}, transformer depth {:?} / middle {}, heads {:?}, context {}, {} projection{}",
            spec.unet.model_channels,
            spec.unet.channel_mult,
            spec.unet.num_res_blocks,
            spec.unet.transformer_depth,
            spec.unet.transformer_depth_middle,
            spec.unet.heads,
            spec.unet.context_dim,
            if spec.unet.use_linear_projection {
                "linear"
            } else {
                "conv"
            },
            spec.unet
                .adm_in_channels
                .map(|a| format!(", added conditioning {a}"))
                .unwrap_or_default()
        );
        println!(
            "groupnorm     {} groups, eps {:e}",
            spec.unet.norm_num_groups, spec.unet.norm_eps
        );
        for (part, file) in slider_models::diffusers_config::describe(config) {
            println!("config        {part} from {}", file.display());
        }
        if !assumed.is_empty() {
            println!(
                "assumed       {} (shapes cannot tell; --config gives them)",
                assumed.join("; ")
            );
        }
        println!("latent scale  {}", spec.family.scaling_factor());
        println!();
        println!(
            "{:<8} {:>15} {:>8}  dtypes",
            "part", "parameters", "tensors"
        );
        for p in &parts {
            println!(
                "{:<8} {:>15} {:>8}  {}",
                p["part"].as_str().unwrap_or(""),
                group_digits(p["parameters"].as_u64().unwrap_or(0)),
                p["tensors"].as_u64().unwrap_or(0),
                p["dtypes"]
                    .as_object()
                    .map(|m| m
                        .iter()
                        .map(|(k, v)| format!("{k} x{v}"))
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
        }
        if spec.vae.is_none() {
            println!("{:<8} absent (no first_stage_model.* keys)", "vae");
        }
        if spec.text_l.is_none() {
            println!("{:<8} absent (no CLIP-L keys)", "text_l");
        }
        if !other.is_empty() {
            println!(
                "other    {} keys outside the model parts (not loaded), e.g. {}",
                other.len(),
                other.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
            );
        }
        println!();
        if report.is_clean() {
            println!("keys          all present, none unexpected");
        } else {
            println!("keys          the checkpoint does not load:");
            print!("{report}");
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('_');
        }
        out.push(c);
    }
    out
}

fn forward(
    path: &Path,
    inputs_path: &Path,
    out: &Path,
    device: &str,
    config: &BaseConfig,
) -> miette::Result<ExitCode> {
    let device = open_device(device).into_diagnostic()?;
    let inputs = read_tensors(inputs_path).into_diagnostic()?;
    let spinner = spinner("loading checkpoint");
    let ckpt = Checkpoint::open(path).into_diagnostic()?;
    let model = StableDiffusion::load_with(&ckpt, config, &device).into_diagnostic()?;
    spinner.set_message("running forward passes");
    let outputs = model
        .forward_named(&inputs, &device)
        .into_diagnostic()
        .wrap_err_with(|| format!("inputs from {}", inputs_path.display()))?;
    spinner.finish_and_clear();
    let names: Vec<String> = outputs.keys().cloned().collect();
    write_tensors(out, outputs).into_diagnostic()?;
    eprintln!(
        "wrote {} output tensors to {}: {}",
        names.len(),
        out.display(),
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

fn spinner(message: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

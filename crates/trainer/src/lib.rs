//! One LoRA training run as kohya's `train_network.py` runs it (UNet only): images encoded once
//! by the VAE (cached in the work dir), the caption encoded once, then per step a uniform
//! timestep, Gaussian noise (plus noise offset), the noisy latent, the UNet's epsilon
//! prediction through the adapters, the (min-SNR weighted) MSE, backward, and an optimizer step
//! per LoRA factor at the schedule's learning rate.
//!
//! Everything random comes from ChaCha8 seeded with the node's seed: stream 0 for the latent
//! sampling, stream `step + 1` for step `step`. The random state of a step is therefore a pure
//! function of (seed, step), and a checkpoint (factors, optimizer state, step, losses; one
//! safetensors file written atomically) resumes bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use slider_models::HostTensor;
use slider_models::checkpoint::{
    Checkpoint, CheckpointError, Encoders, Family, ModelSpec, StableDiffusion,
};
use slider_models::ddpm::{DdpmError, NoiseSchedule, apply_noise_offset, standard_normal};
use slider_models::diffusers_config::BaseConfig;
use slider_models::lora::{AdapterError, Factor, LoraNetwork, NetworkDims};
use slider_models::tokenizer::{Padding, Tokenizer, TokenizerError};
use slider_models::unet::{UNet, UNetInput, added_conditioning};
use slider_optim::{
    LrSchedule, Optimizer, OptimizerError, OptimizerState, ResumeError, ResumeState, ScheduleError,
    ScheduleKind,
};
use slider_protocol::names::{LrScheduler, MixedPrecision, Optimizer as OptimizerName};
use slider_protocol::params::{Input, Precision, TrainParams};

pub mod bench;
#[cfg(test)]
mod parity;
pub mod precision;

use precision::{LossScaler, model_precision};

/// The checkpoint file in the work dir.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The VAE latent cache in the work dir.
pub const LATENT_CACHE_FILE: &str = "latents.safetensors";

/// The settings of one run: a `train` node's parameters with its inputs resolved to paths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The base model's diffusers config (`base_config`), when the recipe gives one. Left out
    /// of the serialisation when absent, so work dirs of earlier runs still resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_config: Option<PathBuf>,
    /// Training images (PNG, JPEG, WebP).
    pub images: Vec<PathBuf>,
    /// The caption of every image.
    pub caption: String,
    /// `learning_rate`.
    pub learning_rate: f64,
    /// `unet_lr`; `learning_rate` when absent.
    pub unet_lr: Option<f64>,
    /// `train_batch_size`.
    pub train_batch_size: usize,
    /// `max_train_steps`.
    pub max_train_steps: usize,
    /// `network_dim`.
    pub network_dim: usize,
    /// `network_alpha`.
    pub network_alpha: f64,
    /// `conv_dim` (kohya's `--network_args conv_dim=N`, "LoCon"): also adapt the ResNet blocks'
    /// and samplers' modules, their 3x3 convolutions at this rank; `None` (or 0) adapts only
    /// the transformers.
    #[serde(default)]
    pub conv_dim: Option<usize>,
    /// `conv_alpha`: the 3x3 convolutions' alpha; kohya's default 1.
    #[serde(default)]
    pub conv_alpha: Option<f64>,
    /// `lr_scheduler`.
    pub lr_scheduler: LrScheduler,
    /// `lr_warmup_steps`.
    pub lr_warmup_steps: usize,
    /// `optimizer_type`.
    pub optimizer_type: OptimizerName,
    /// `optimizer_args`.
    pub optimizer_args: BTreeMap<String, String>,
    /// `seed`.
    pub seed: u64,
    /// Square training resolution in pixels.
    pub resolution: usize,
    /// `noise_offset`.
    pub noise_offset: f64,
    /// `min_snr_gamma`.
    pub min_snr_gamma: Option<f64>,
    /// `mixed_precision`: the dtype the frozen UNet (and VAE) are held and computed in; the
    /// factors, their gradients, the optimizer and the loss stay f32 (see [`precision`]).
    pub mixed_precision: MixedPrecision,
    /// `no_half_vae`: the VAE stays f32 under a half `mixed_precision`. Left out of the
    /// serialisation when false, so work dirs of earlier runs still resume.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_half_vae: bool,
    /// `gradient_checkpointing`: recompute the UNet one unit (ResBlock, transformer block,
    /// ...) at a time in the backward pass, keeping only the units' inputs.
    pub gradient_checkpointing: bool,
    /// `save_precision`.
    pub save_precision: Precision,
    /// Steps between checkpoints; 0 checkpoints only on a clean stop.
    pub checkpoint_every: usize,
    /// `training_comment`.
    pub comment: String,
}

impl TrainConfig {
    /// The config of a `train` node from its parameters and a resolver from each input
    /// (`base`, `images[i]`) to the file holding it.
    pub fn from_params(
        params: &TrainParams,
        resolve: impl Fn(&Input) -> Option<PathBuf>,
    ) -> Result<Self, TrainError> {
        let file = |input: &Input| {
            resolve(input).ok_or_else(|| {
                TrainError::Config(format!("`train` node: no file for input {input:?}"))
            })
        };
        if !params.network_train_unet_only {
            return Err(TrainError::Config(
                "text-encoder training is not implemented: set `network_train_unet_only: true`"
                    .into(),
            ));
        }
        Ok(Self {
            base: file(&params.base)?,
            base_config: params.base_config.as_ref().map(file).transpose()?,
            images: params.images.iter().map(file).collect::<Result<_, _>>()?,
            caption: params.caption.clone(),
            learning_rate: params.learning_rate,
            unet_lr: params.unet_lr,
            train_batch_size: params.train_batch_size,
            max_train_steps: params.max_train_steps,
            network_dim: params.network_dim,
            network_alpha: params.network_alpha,
            conv_dim: params.conv_dim,
            conv_alpha: params.conv_alpha,
            lr_scheduler: params.lr_scheduler,
            lr_warmup_steps: params.lr_warmup_steps,
            optimizer_type: params.optimizer_type,
            optimizer_args: params.optimizer_args.clone(),
            seed: params.seed,
            resolution: params.resolution,
            noise_offset: params.noise_offset,
            min_snr_gamma: params.min_snr_gamma,
            mixed_precision: params.mixed_precision,
            no_half_vae: params.no_half_vae,
            gradient_checkpointing: params.gradient_checkpointing,
            save_precision: params.save_precision,
            checkpoint_every: params.checkpoint_every,
            comment: params.training_comment.clone(),
        })
    }
}

/// Why a run failed or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The base model.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// The adapters.
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    /// The optimizer.
    #[error(transparent)]
    Optimizer(#[from] OptimizerError),
    /// The schedule.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// The noise schedule.
    #[error(transparent)]
    Ddpm(#[from] DdpmError),
    /// The tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The output LoRA.
    #[error(transparent)]
    Lora(#[from] slider_lora::LoraError),
    /// An image could not be read.
    #[error("{path}: {message}")]
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A setting cannot be used.
    #[error("{0}")]
    Config(String),
    /// The base checkpoint lacks a part training needs.
    #[error("the base checkpoint has no {0}: training needs it")]
    MissingPart(&'static str),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The checkpoint in the work dir is damaged or from other settings.
    #[error("{path}: cannot resume: {message}")]
    Resume {
        /// The checkpoint.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The loss is not finite.
    #[error("the loss is {loss} at step {step}{hint}")]
    Diverged {
        /// The step.
        step: usize,
        /// The loss.
        loss: f32,
        /// What to try, or empty.
        hint: &'static str,
    },
    /// The run was asked to stop; a checkpoint at `step` was written.
    #[error("stopped after step {step}; a checkpoint was written")]
    Stopped {
        /// Steps done.
        step: usize,
    },
}

/// One finished step, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps done (1-based).
    pub step: usize,
    /// `max_train_steps`.
    pub total: usize,
    /// This step's loss.
    pub loss: f32,
}

/// What a finished run wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOutcome {
    /// The kohya LoRA.
    pub lora: PathBuf,
    /// `step,loss,lr` per step.
    pub loss_csv: PathBuf,
    /// The step the run resumed from (0 for a fresh run).
    pub resumed_from: usize,
}

/// Runs (or resumes, from `work_dir`'s checkpoint) the training `config` describes and writes
/// `lora.safetensors`, then `loss.csv`, into `output_dir`. `progress` is called after every
/// step; when `stop` becomes true the run checkpoints and returns [`TrainError::Stopped`].
pub fn train(
    config: &TrainConfig,
    work_dir: &Path,
    output_dir: &Path,
    device: &Device,
    mut progress: impl FnMut(Progress),
    stop: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    check(config)?;
    let ckpt = Checkpoint::open(&config.base)?;
    let base_config = match &config.base_config {
        Some(path) => BaseConfig::load(path).map_err(CheckpointError::from)?,
        None => BaseConfig::none(),
    };
    let precision = model_precision(config.mixed_precision, config.no_half_vae);
    let spec = ModelSpec::detect_with(&ckpt, &base_config)?;
    // The encoders first (every key of the checkpoint is checked here, the UNet's included),
    // then, once the latents and the caption are cached and the encoders freed, the UNet: the
    // two never sit in memory together.
    let model = StableDiffusion::load_encoders(&ckpt, spec, precision, device)?;
    let multiple = model.spec.pixel_multiple();
    if !config.resolution.is_multiple_of(multiple) {
        return Err(TrainError::Config(format!(
            "resolution {} does not fit {}: it must be a multiple of {multiple} (the VAE's \
             downsampling times the UNet's)",
            config.resolution,
            config.base.display()
        )));
    }
    let family = model.spec.family;
    let latents = cached_latents(config, &model, work_dir, device)?;
    let (context, added) = encode_caption(config, &model, device)?;
    let Encoders {
        spec,
        vae,
        text_l,
        text_g,
    } = model;
    drop((vae, text_l, text_g));
    let unet = StableDiffusion::load_unet(&ckpt, &spec, precision.unet, device)?;
    drop(ckpt);

    let schedule = LrSchedule::new(
        ScheduleKind::from_name(config.lr_scheduler.name())?,
        config.unet_lr.unwrap_or(config.learning_rate),
        config.lr_warmup_steps,
        config.max_train_steps,
    )?;
    let noise_schedule = NoiseSchedule::stable_diffusion();
    let config_json =
        serde_json::to_string(config).map_err(|e| TrainError::Config(e.to_string()))?;
    let checkpoint_path = work_dir.join(CHECKPOINT_FILE);

    let (
        mut network,
        mut optimizer,
        Run {
            mut losses,
            mut scaler,
        },
    ) = resume_or_start(config, &unet, &checkpoint_path, &config_json, device)?;
    let resumed_from = losses.len();
    if resumed_from > 0 {
        tracing::info!(step = resumed_from, "resuming from the checkpoint");
    }
    let batch = Batch {
        config,
        unet: &unet,
        latents: &latents,
        context: &context,
        added: &added,
        noise_schedule: &noise_schedule,
        device,
    };
    let save = |network: &LoraNetwork,
                optimizer: &Optimizer,
                losses: &[(f32, f64)],
                scaler: Option<LossScaler>| {
        save_checkpoint(
            &checkpoint_path,
            network,
            optimizer,
            losses,
            scaler,
            &config_json,
        )
    };
    for step in resumed_from..config.max_train_steps {
        if stop.load(Ordering::Relaxed) {
            save(&network, &optimizer, &losses, scaler)?;
            return Err(TrainError::Stopped { step });
        }
        // Steps fp16 skipped for overflow do not advance the schedule (accelerate's
        // scheduler skips with the optimizer, so kohya's does not either).
        let lr = schedule.lr_at(step - scaler.map_or(0, |s| s.skipped));
        let loss = batch.step(step, lr, &mut network, &mut optimizer, &mut scaler)?;
        losses.push((loss, lr));
        progress(Progress {
            step: step + 1,
            total: config.max_train_steps,
            loss,
        });
        let done = step + 1;
        if config.checkpoint_every > 0
            && done.is_multiple_of(config.checkpoint_every)
            && done < config.max_train_steps
        {
            save(&network, &optimizer, &losses, scaler)?;
        }
    }
    let (lora, loss_csv) =
        write_outputs(config, family, &network, &optimizer, &losses, output_dir)?;
    Ok(TrainOutcome {
        lora,
        loss_csv,
        resumed_from,
    })
}

/// The (loss, learning rate) of every step done.
type Losses = Vec<(f32, f64)>;

/// The loop's own state: the losses so far and fp16's loss scale.
struct Run {
    losses: Losses,
    scaler: Option<LossScaler>,
}

/// The network, optimizer and losses from the checkpoint at `path` if there is one for these
/// settings, else fresh ones from the seed.
fn resume_or_start(
    config: &TrainConfig,
    unet: &UNet,
    path: &Path,
    config_json: &str,
    device: &Device,
) -> Result<(LoraNetwork, Optimizer, Run), TrainError> {
    Ok(match load_checkpoint(path, config_json)? {
        Some((_, _, run))
            if run.scaler.is_some()
                != LossScaler::for_precision(config.mixed_precision).is_some() =>
        {
            return Err(TrainError::Resume {
                path: path.to_path_buf(),
                message: "the checkpoint's loss scale does not fit `mixed_precision` (a \
                          checkpoint of another version?): delete it to start over"
                    .into(),
            });
        }
        Some((net, state, run)) => {
            let optimizer = Optimizer::restore(
                config.optimizer_type.name(),
                &config.optimizer_args,
                &state,
                device,
            )?;
            (LoraNetwork::from_lora(&net, unet, device)?, optimizer, run)
        }
        None => (
            LoraNetwork::init_with(unet, network_dims(config), config.seed, device)?,
            Optimizer::from_kohya(config.optimizer_type.name(), &config.optimizer_args)?,
            Run {
                losses: Vec::new(),
                scaler: LossScaler::for_precision(config.mixed_precision),
            },
        ),
    })
}

/// What every step reads: the frozen UNet, the cached latents, the encoded caption.
struct Batch<'a> {
    config: &'a TrainConfig,
    unet: &'a UNet,
    latents: &'a [Tensor<4>],
    context: &'a Tensor<3>,
    added: &'a Option<Tensor<2>>,
    noise_schedule: &'a NoiseSchedule,
    device: &'a Device,
}

impl Batch<'_> {
    /// Step `step` (0-based) at learning rate `lr`: its timesteps and noise from (seed, step),
    /// the noisy latents, the (min-SNR weighted) loss, backward and an optimizer step per
    /// factor. Under fp16 the loss is scaled for the backward pass and the step is skipped
    /// when a gradient overflowed (`scaler`). Returns the loss.
    fn step(
        &self,
        step: usize,
        lr: f64,
        network: &mut LoraNetwork,
        optimizer: &mut Optimizer,
        scaler: &mut Option<LossScaler>,
    ) -> Result<f32, TrainError> {
        let (config, device) = (self.config, self.device);
        let batch = config.train_batch_size;
        let [_, c, h, w] = self.latents[0].dims();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        rng.set_stream(step as u64 + 1);
        let timesteps: Vec<usize> = (0..batch).map(|_| rng.random_range(0..1000)).collect();
        let noise = standard_normal(&mut rng, [batch, c, h, w], device);
        let noise = if config.noise_offset != 0.0 {
            let offset = standard_normal(&mut rng, [batch, c, 1, 1], device);
            apply_noise_offset(noise, config.noise_offset, offset)
        } else {
            noise
        };
        let x0 = Tensor::cat(
            (0..batch)
                .map(|i| self.latents[(step * batch + i) % self.latents.len()].clone())
                .collect(),
            0,
        );
        let noisy = self
            .noise_schedule
            .add_noise(x0, noise.clone(), &timesteps)?;
        let weights: Vec<f32> = match config.min_snr_gamma {
            Some(gamma) => timesteps
                .iter()
                .map(|&t| self.noise_schedule.min_snr_weight(t, gamma as f32))
                .collect::<Result<_, _>>()?,
            None => vec![1.0; batch],
        };

        for m in network.modules.values_mut() {
            m.down = m.down.clone().tracked();
            m.up = m.up.clone().tracked();
        }
        let t = Tensor::<1>::from_data(
            TensorData::new(timesteps.iter().map(|&t| t as f32).collect(), [batch]),
            device,
        );
        let input = UNetInput {
            sample: noisy,
            timestep: t,
            context: self.context.clone().repeat_dim(0, batch),
            y: self.added.clone().map(|y| y.repeat_dim(0, batch)),
        };
        let weights = Tensor::<2>::from_data(TensorData::new(weights, [batch, 1]), device);
        let scale = scaler.map_or(1.0, |s| s.scale);
        let objective = |pred: Tensor<4>| {
            let per_sample = (pred - noise.clone())
                .square()
                .reshape([batch, c * h * w])
                .mean_dim(1);
            let loss = (per_sample * weights.clone()).mean();
            if scale == 1.0 {
                loss
            } else {
                loss.mul_scalar(scale)
            }
        };
        let (loss, grads) = if config.gradient_checkpointing {
            let (loss, containers) =
                network.recomputed_gradients(self.unet, 1.0, input, &objective);
            let loss = loss.ok_or_else(|| TrainError::Config("the UNet has no layers".into()))?;
            (loss, StepGradients::PerUnit(containers))
        } else {
            let pred = network.forward(
                self.unet,
                1.0,
                input.sample,
                input.timestep,
                input.context,
                input.y,
            );
            let loss = objective(pred);
            let grads = loss.backward();
            (loss, StepGradients::One(grads))
        };
        let loss_value = loss.into_scalar::<f32>() / scale;
        if !loss_value.is_finite() {
            // A half forward pass that overflowed: kohya's GradScaler would skip the step,
            // halve the scale and meet the same overflow at the next one, which no scale can
            // fix. Stopping says so instead.
            let hint = match config.mixed_precision {
                MixedPrecision::Fp16 => {
                    " (the fp16 forward pass overflowed: try `mixed_precision: bf16`, which has \
                     f32's range)"
                }
                _ => "",
            };
            return Err(TrainError::Diverged {
                step: step + 1,
                loss: loss_value,
                hint,
            });
        }
        // Per module: (name, gradient) of `lora_down` and of `lora_up`.
        let mut gradients = Vec::with_capacity(network.modules.len());
        for (name, m) in &network.modules {
            let of = |suffix: &str, factor: &Factor| {
                let key = format!("{name}.{suffix}.weight");
                let gradient = gradient_of(factor, &grads, scale)
                    .ok_or_else(|| TrainError::Config(format!("no gradient reached `{key}`")))?;
                Ok::<_, TrainError>((key, gradient))
            };
            gradients.push([of("lora_down", &m.down)?, of("lora_up", &m.up)?]);
        }
        if let Some(scaler) = scaler {
            // One read-back for all factors: whether every gradient value is finite.
            let finite = gradients
                .iter()
                .flatten()
                .map(|(_, g)| g.all_finite())
                .reduce(|a, b| a.bool_and(b))
                .is_none_or(|all| all.into_scalar::<bool>());
            scaler.update(finite);
            if !finite {
                tracing::debug!(
                    step = step + 1,
                    scale,
                    "fp16 gradients overflowed: step skipped"
                );
                for m in network.modules.values_mut() {
                    m.down = m.down.clone().untracked();
                    m.up = m.up.clone().untracked();
                }
                return Ok(loss_value);
            }
        }
        for (m, [(down_key, down), (up_key, up)]) in network.modules.values_mut().zip(gradients) {
            m.down = step_factor(optimizer, &down_key, lr, &m.down, down)?;
            m.up = step_factor(optimizer, &up_key, lr, &m.up, up)?;
        }
        Ok(loss_value)
    }
}

/// Writes `lora.safetensors` (with kohya's metadata, in the save precision) and `loss.csv`.
fn write_outputs(
    config: &TrainConfig,
    family: Family,
    network: &LoraNetwork,
    optimizer: &Optimizer,
    losses: &[(f32, f64)],
    output_dir: &Path,
) -> Result<(PathBuf, PathBuf), TrainError> {
    std::fs::create_dir_all(output_dir).map_err(|source| TrainError::Io {
        path: output_dir.to_path_buf(),
        source,
    })?;
    let mut lora = network.to_lora()?;
    lora.metadata = kohya_metadata(config, family, optimizer);
    let lora_path = output_dir.join("lora.safetensors");
    let precision = match config.save_precision {
        Precision::Float => slider_lora::Precision::F32,
        Precision::Fp16 => slider_lora::Precision::F16,
        Precision::Bf16 => slider_lora::Precision::Bf16,
    };
    lora.save(&lora_path, precision)?;
    let mut csv = String::from("step,loss,lr\n");
    for (i, (loss, lr)) in losses.iter().enumerate() {
        csv.push_str(&format!("{},{loss},{lr}\n", i + 1));
    }
    let loss_csv = output_dir.join("loss.csv");
    write_atomic(&loss_csv, csv.as_bytes())?;
    Ok((lora_path, loss_csv))
}

/// The network's ranks and alphas; `conv_dim` 0 means no LoCon modules, as in kohya.
fn network_dims(config: &TrainConfig) -> NetworkDims {
    NetworkDims {
        rank: config.network_dim,
        alpha: config.network_alpha as f32,
        conv: config
            .conv_dim
            .filter(|&d| d > 0)
            .map(|d| (d, config.conv_alpha.unwrap_or(1.0) as f32)),
    }
}

fn check(config: &TrainConfig) -> Result<(), TrainError> {
    let bad = |m: String| Err(TrainError::Config(m));
    if config.images.is_empty() {
        return bad("a train node needs at least one image".into());
    }
    if config.train_batch_size == 0 || config.max_train_steps == 0 {
        return bad("train_batch_size and max_train_steps must be at least 1".into());
    }
    if config.resolution == 0 || !config.resolution.is_multiple_of(8) {
        return bad(format!(
            "resolution {} is not a positive multiple of 8",
            config.resolution
        ));
    }
    Ok(())
}

/// A step's gradients: one container from a plain backward pass, or one per unit of a
/// recomputed one (each factor is in exactly one of them).
enum StepGradients {
    One(burn::tensor::Gradients),
    PerUnit(Vec<burn::tensor::Gradients>),
}

impl StepGradients {
    fn of<const D: usize>(&self, factor: &Tensor<D>) -> Option<Tensor<D>> {
        match self {
            StepGradients::One(grads) => factor.grad(grads),
            StepGradients::PerUnit(containers) => containers.iter().find_map(|g| factor.grad(g)),
        }
    }
}

/// The gradient of `factor` (in its shape, f32), divided by the loss scale.
fn gradient_of(factor: &Factor, grads: &StepGradients, scale: f32) -> Option<Factor> {
    fn unscaled<const D: usize>(g: Tensor<D>, scale: f32) -> Tensor<D> {
        if scale == 1.0 { g } else { g.div_scalar(scale) }
    }
    Some(match factor {
        Factor::Linear(p) => Factor::Linear(unscaled(grads.of(p)?, scale)),
        Factor::Conv(p) => Factor::Conv(unscaled(grads.of(p)?, scale)),
    })
}

/// One optimizer step of `factor` along `gradient` (of the same kind and shape).
fn step_factor(
    optimizer: &mut Optimizer,
    name: &str,
    lr: f64,
    factor: &Factor,
    gradient: Factor,
) -> Result<Factor, TrainError> {
    Ok(match (factor, gradient) {
        (Factor::Linear(p), Factor::Linear(g)) => {
            Factor::Linear(optimizer.step(name, lr, p.clone().without_autodiff(), g)?)
        }
        (Factor::Conv(p), Factor::Conv(g)) => {
            Factor::Conv(optimizer.step(name, lr, p.clone().without_autodiff(), g)?)
        }
        _ => {
            return Err(TrainError::Config(format!(
                "`{name}`: the gradient's kind differs from the factor's"
            )));
        }
    })
}

/// Loads, resizes (short side to `resolution`, Lanczos) and centre-crops an image to
/// `[1, 3, res, res]` in [-1, 1].
fn load_image(path: &Path, resolution: usize, device: &Device) -> Result<Tensor<4>, TrainError> {
    let err = |message: String| TrainError::Image {
        path: path.to_path_buf(),
        message,
    };
    let image = image::open(path).map_err(|e| err(e.to_string()))?.to_rgb8();
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(err("empty image".into()));
    }
    let res = resolution as u32;
    let scale = res as f64 / f64::from(w.min(h));
    let (nw, nh) = (
        ((f64::from(w) * scale).round() as u32).max(res),
        ((f64::from(h) * scale).round() as u32).max(res),
    );
    let resized = image::imageops::resize(&image, nw, nh, image::imageops::FilterType::Lanczos3);
    let (left, top) = ((nw - res) / 2, (nh - res) / 2);
    let crop = image::imageops::crop_imm(&resized, left, top, res, res).to_image();
    let r = resolution;
    let mut chw = vec![0f32; 3 * r * r];
    for (x, y, px) in crop.enumerate_pixels() {
        for ch in 0..3 {
            chw[ch * r * r + y as usize * r + x as usize] = f32::from(px[ch]) / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(chw, [1, 3, r, r]),
        device,
    ))
}

/// The scaled latents of every image, from the cache when it was made for the same images,
/// resolution, base and seed; otherwise encoded (sampled from the VAE's distribution with
/// stream 0 of the seed, as kohya's `latent_dist.sample()`) and cached.
fn cached_latents(
    config: &TrainConfig,
    model: &Encoders,
    work_dir: &Path,
    device: &Device,
) -> Result<Vec<Tensor<4>>, TrainError> {
    let mut key = cache_key_prefix(config);
    for image in &config.images {
        let bytes = std::fs::read(image).map_err(|source| TrainError::Io {
            path: image.clone(),
            source,
        })?;
        key.push_str(&format!(":{:016x}", fnv1a(&bytes)));
    }
    let path = work_dir.join(LATENT_CACHE_FILE);
    if let Ok(bytes) = std::fs::read(&path)
        && let Some(latents) = read_latents(&bytes, &key, config.images.len(), device)
    {
        return Ok(latents);
    }
    let vae = model.vae.as_ref().ok_or(TrainError::MissingPart("VAE"))?;
    let scaling = model.spec.family.scaling_factor();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(0);
    let mut latents = Vec::new();
    for image in &config.images {
        let pixels = load_image(image, config.resolution, device)?;
        let (mean, logvar) = vae.encode(pixels);
        let eps = standard_normal(&mut rng, mean.dims(), device);
        let latent = (mean + (logvar * 0.5).exp() * eps) * scaling;
        if !latent.clone().sum().into_scalar::<f32>().is_finite() {
            return Err(TrainError::Config(format!(
                "the VAE encoded {} to non-finite latents{}",
                image.display(),
                if config.no_half_vae || config.mixed_precision == MixedPrecision::No {
                    ""
                } else {
                    " (a VAE overflows in half precision: set `no_half_vae: true`)"
                }
            )));
        }
        latents.push(latent);
    }
    let mut named = Vec::new();
    for (i, l) in latents.iter().enumerate() {
        let values = l
            .clone()
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| TrainError::Config(format!("latent readback: {e:?}")))?;
        named.push((format!("latent.{i}"), l.dims().to_vec(), f32_bytes(&values)));
    }
    let meta = HashMap::from([("key".to_owned(), key)]);
    write_atomic(&path, &serialize(&named, meta)?)?;
    Ok(latents)
}

fn cache_key_prefix(config: &TrainConfig) -> String {
    let key = format!(
        "{}:{}:{}",
        config.base.display(),
        config.resolution,
        config.seed
    );
    // A half VAE encodes other latents; f32 keeps the key of earlier runs.
    match model_precision(config.mixed_precision, config.no_half_vae).vae {
        burn::tensor::FloatDType::F32 => key,
        _ => format!("{key}:vae-{}", config.mixed_precision.name()),
    }
}

/// 64-bit FNV-1a: identifies image bytes in the latent cache key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn read_latents(bytes: &[u8], key: &str, n: usize, device: &Device) -> Option<Vec<Tensor<4>>> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    if meta.metadata().as_ref()?.get("key")? != key {
        return None;
    }
    let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
    (0..n)
        .map(|i| {
            let view = st.tensor(&format!("latent.{i}")).ok()?;
            let shape: [usize; 4] = view.shape().try_into().ok()?;
            let values = f32_values(view.data());
            Some(Tensor::from_data(TensorData::new(values, shape), device))
        })
        .collect()
}

/// The caption's context `[1, n, context_dim]` and, for SDXL, the added conditioning.
fn encode_caption(
    config: &TrainConfig,
    model: &Encoders,
    device: &Device,
) -> Result<(Tensor<3>, Option<Tensor<2>>), TrainError> {
    model.spec.check_tokenizer_fits()?;
    let tokenizer = Tokenizer::clip()?;
    let ids = |padding| {
        let ids: Vec<i64> = tokenizer
            .tokenize(&config.caption, padding)
            .into_iter()
            .map(i64::from)
            .collect();
        let n = ids.len();
        Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device)
    };
    let text_l = model
        .text_l
        .as_ref()
        .ok_or(TrainError::MissingPart("CLIP-L text encoder"))?;
    let l = text_l.forward(ids(Padding::EndToken));
    match model.spec.family {
        Family::Sd1 => Ok((l.last, None)),
        Family::Sdxl => {
            let text_g = model
                .text_g
                .as_ref()
                .ok_or(TrainError::MissingPart("OpenCLIP bigG text encoder"))?;
            let g = text_g.forward(ids(Padding::Zero));
            let r = config.resolution as f32;
            let time_ids =
                Tensor::<2>::from_data(TensorData::new(vec![r, r, 0.0, 0.0, r, r], [1, 6]), device);
            let y = added_conditioning(model.spec.unet.size_embed_dim, g.pooled, time_ids);
            Ok((Tensor::cat(vec![l.penultimate, g.penultimate], 2), Some(y)))
        }
    }
}

/// The `ss_*` metadata kohya's `train_network.py` writes, without its timestamps (a rerun of
/// the same node must write the same bytes).
fn kohya_metadata(
    config: &TrainConfig,
    family: Family,
    optimizer: &Optimizer,
) -> BTreeMap<String, String> {
    let optimizer_name = if config.optimizer_args.is_empty() {
        optimizer.kohya_class().to_owned()
    } else {
        let args: Vec<String> = config
            .optimizer_args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{}({})", optimizer.kohya_class(), args.join(","))
    };
    let base_name = config
        .base
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let r = config.resolution;
    let py_bool = |b: bool| if b { "True" } else { "False" }.to_owned();
    let entries = [
        ("ss_network_module", "networks.lora".to_owned()),
        ("ss_network_dim", config.network_dim.to_string()),
        ("ss_network_alpha", format!("{:?}", config.network_alpha)),
        ("ss_optimizer", optimizer_name),
        ("ss_learning_rate", config.learning_rate.to_string()),
        (
            "ss_unet_lr",
            config.unet_lr.unwrap_or(config.learning_rate).to_string(),
        ),
        ("ss_text_encoder_lr", "None".to_owned()),
        ("ss_lr_scheduler", config.lr_scheduler.name().to_owned()),
        ("ss_lr_warmup_steps", config.lr_warmup_steps.to_string()),
        ("ss_max_train_steps", config.max_train_steps.to_string()),
        ("ss_steps", config.max_train_steps.to_string()),
        ("ss_epoch", "1".to_owned()),
        ("ss_seed", config.seed.to_string()),
        ("ss_train_batch_size", config.train_batch_size.to_string()),
        ("ss_num_train_images", config.images.len().to_string()),
        (
            "ss_base_model_version",
            match family {
                Family::Sd1 => "sd_v1",
                Family::Sdxl => "sdxl_base_v1-0",
            }
            .to_owned(),
        ),
        ("ss_v2", "False".to_owned()),
        ("ss_sd_model_name", base_name),
        ("ss_network_train_unet_only", py_bool(true)),
        ("ss_resolution", format!("({r}, {r})")),
        ("ss_noise_offset", config.noise_offset.to_string()),
        (
            "ss_min_snr_gamma",
            config
                .min_snr_gamma
                .map_or("None".to_owned(), |g| g.to_string()),
        ),
        (
            "ss_mixed_precision",
            config.mixed_precision.name().to_owned(),
        ),
        (
            "ss_gradient_checkpointing",
            py_bool(config.gradient_checkpointing),
        ),
        ("ss_training_comment", config.comment.clone()),
        ("ss_caption", config.caption.clone()),
    ];
    let mut metadata: BTreeMap<String, String> = entries
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    if let Some((conv_dim, conv_alpha)) = network_dims(config).conv {
        // kohya records `--network_args` as JSON of the strings given.
        let args = serde_json::json!({
            "conv_dim": conv_dim.to_string(),
            "conv_alpha": conv_alpha.to_string(),
        });
        metadata.insert("ss_network_args".to_owned(), args.to_string());
    }
    metadata
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn serialize(
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, TrainError> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, shape, bytes) in tensors {
        let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| TrainError::Config(format!("{name}: {e}")))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize(views, Some(metadata)).map_err(|e| TrainError::Config(e.to_string()))
}

impl From<ResumeError> for TrainError {
    fn from(e: ResumeError) -> Self {
        match e {
            ResumeError::Io { path, source } => TrainError::Io { path, source },
            ResumeError::OtherFormat { ref path }
            | ResumeError::OtherSettings { ref path, .. }
            | ResumeError::Damaged { ref path, .. } => TrainError::Resume {
                path: path.clone(),
                message: e.to_string(),
            },
        }
    }
}

/// The loop's own part of the checkpoint: the loss and lr of every step done, and each
/// module's alpha.
#[derive(Serialize, Deserialize)]
struct CheckpointProgress {
    losses: Vec<(f32, f64)>,
    alphas: BTreeMap<String, f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    loss_scale: Option<LossScaler>,
}

/// The checkpoint, a [`ResumeState`]: factors as `<name>.lora_{down,up}.weight` (f32), the
/// optimizer's state, the settings, and the losses and alphas as progress.
fn save_checkpoint(
    path: &Path,
    network: &LoraNetwork,
    optimizer: &Optimizer,
    losses: &[(f32, f64)],
    scaler: Option<LossScaler>,
    config_json: &str,
) -> Result<(), TrainError> {
    let lora = network.to_lora()?;
    let mut tensors = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    for (name, m) in &lora.modules {
        let host = |shape: Vec<usize>, values: &[f32]| HostTensor {
            shape,
            values: values.to_vec(),
        };
        tensors.insert(
            format!("{name}.lora_down.weight"),
            host(m.down_shape(), &m.down),
        );
        tensors.insert(format!("{name}.lora_up.weight"), host(m.up_shape(), &m.up));
        alphas.insert(name.clone(), m.alpha);
    }
    let progress = serde_json::to_string(&CheckpointProgress {
        losses: losses.to_vec(),
        alphas,
        loss_scale: scaler,
    })
    .map_err(|e| TrainError::Config(e.to_string()))?;
    ResumeState {
        settings: config_json.to_owned(),
        step: losses.len(),
        progress,
        tensors,
        optimizer: optimizer.state(),
    }
    .write(path)?;
    tracing::debug!(step = losses.len(), "checkpoint written");
    Ok(())
}

type Resumed = (slider_lora::Lora, OptimizerState, Run);

/// The checkpoint at `path`, if there is one for `config_json`. A checkpoint of an earlier
/// version's format is set aside (training starts over and overwrites it): the result is the
/// same bytes, only the time is lost.
fn load_checkpoint(path: &Path, config_json: &str) -> Result<Option<Resumed>, TrainError> {
    let state = match ResumeState::read(path, config_json) {
        Ok(Some(state)) => state,
        Ok(None) => return Ok(None),
        Err(ResumeError::OtherFormat { path }) => {
            tracing::warn!(
                path = %path.display(),
                "a checkpoint of an earlier version: training starts over"
            );
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let bad = |message: String| TrainError::Resume {
        path: path.to_path_buf(),
        message,
    };
    let progress: CheckpointProgress =
        serde_json::from_str(&state.progress).map_err(|e| bad(e.to_string()))?;
    if progress.losses.len() != state.step {
        return Err(bad(format!(
            "{} losses for step {}",
            progress.losses.len(),
            state.step
        )));
    }
    let mut lora = slider_lora::Lora::default();
    for (name, alpha) in progress.alphas {
        let factor = |suffix: &str| {
            state
                .tensors
                .get(&format!("{name}.{suffix}"))
                .ok_or_else(|| bad(format!("no tensor `{name}.{suffix}`")))
        };
        let (down, up) = (factor("lora_down.weight")?, factor("lora_up.weight")?);
        let (kind, rank, in_dim, out_dim) = match (down.shape.as_slice(), up.shape.as_slice()) {
            ([rank, in_dim, kh, kw], [out_dim, r, 1, 1]) if r == rank => (
                slider_lora::ModuleKind::Conv { kh: *kh, kw: *kw },
                *rank,
                *in_dim,
                *out_dim,
            ),
            ([rank, in_dim], [out_dim, r]) if r == rank => {
                (slider_lora::ModuleKind::Linear, *rank, *in_dim, *out_dim)
            }
            (d, u) => {
                return Err(bad(format!(
                    "`{name}`: factor shapes {d:?} (down) and {u:?} (up) do not form a LoRA"
                )));
            }
        };
        lora.modules.insert(
            name,
            slider_lora::Module {
                kind,
                out_dim,
                in_dim,
                rank,
                up: up.values.clone(),
                down: down.values.clone(),
                alpha,
                alpha_storage: slider_lora::AlphaStorage::Float,
                dtype: slider_lora::TensorDtype::F32,
            },
        );
    }
    let run = Run {
        losses: progress.losses,
        scaler: progress.loss_scale,
    };
    Ok(Some((lora, state.optimizer, run)))
}

/// Creates the parent directory, then writes atomically (temp file, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let io = |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    slider_atomic::write(path, bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slider_models::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
    use slider_models::unet::UNetConfig;

    /// Env var that turns [`child_training_run`] into a training process for the kill test.
    const CHILD_DIR: &str = "SLIDER_TRAIN_CHILD_DIR";

    /// Base model, two images (PNG and JPEG, not square) and the config, in `dir`.
    fn setup(dir: &Path, steps: usize, checkpoint_every: usize) -> TrainConfig {
        let base = dir.join("base.safetensors");
        write_random_checkpoint(&base, &ModelSpec::small_test(), StoreDtype::F32, 5).unwrap();
        let mut images = Vec::new();
        for (name, w, h) in [("a.png", 40, 32), ("b.jpg", 32, 48)] {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 6) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
            });
            let path = dir.join(name);
            img.save(&path).unwrap();
            images.push(path);
        }
        TrainConfig {
            base,
            base_config: None,
            images,
            caption: "a photo of sks".into(),
            learning_rate: 1e-3,
            unet_lr: None,
            train_batch_size: 2,
            max_train_steps: steps,
            network_dim: 4,
            network_alpha: 1.0,
            conv_dim: None,
            conv_alpha: None,
            lr_scheduler: LrScheduler::ConstantWithWarmup,
            lr_warmup_steps: 2,
            optimizer_type: OptimizerName::Came,
            optimizer_args: BTreeMap::new(),
            seed: 42,
            resolution: 32,
            noise_offset: 0.05,
            min_snr_gamma: Some(5.0),
            mixed_precision: MixedPrecision::No,
            no_half_vae: false,
            gradient_checkpointing: false,
            save_precision: Precision::Float,
            checkpoint_every,
            comment: "test".into(),
        }
    }

    fn run(config: &TrainConfig, work: &Path, out: &Path) -> Result<TrainOutcome, TrainError> {
        train(
            config,
            work,
            out,
            &Device::flex(),
            |_| {},
            &AtomicBool::new(false),
        )
    }

    /// The loss column of a `loss.csv`.
    fn losses(path: &Path) -> Vec<f64> {
        String::from_utf8(read(path))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    }

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn a_run_writes_a_kohya_lora_with_its_metadata_and_the_losses() {
        let dir = tempfile::tempdir().unwrap();
        let config = setup(dir.path(), 4, 0);
        let mut seen = Vec::new();
        let out = dir.path().join("out");
        let stop = AtomicBool::new(false);
        let outcome = train(
            &config,
            &dir.path().join("work"),
            &out,
            &Device::flex(),
            |p| seen.push(p),
            &stop,
        )
        .unwrap();
        assert_eq!(
            seen.iter().map(|p| (p.step, p.total)).collect::<Vec<_>>(),
            [(1, 4), (2, 4), (3, 4), (4, 4)]
        );
        assert!(seen.iter().all(|p| p.loss.is_finite() && p.loss > 0.0));
        let lora = slider_lora::Lora::load(&outcome.lora).unwrap();
        assert_eq!(lora.modules.len(), 7 * 12);
        assert!(lora.modules.values().all(|m| m.rank == 4 && m.alpha == 1.0));
        assert!(
            lora.modules
                .values()
                .any(|m| m.up.iter().any(|v| *v != 0.0)),
            "trained"
        );
        for (key, want) in [
            ("ss_network_module", "networks.lora"),
            ("ss_network_dim", "4"),
            ("ss_network_alpha", "1.0"),
            ("ss_optimizer", "came_pytorch.CAME.CAME"),
            ("ss_lr_scheduler", "constant_with_warmup"),
            ("ss_lr_warmup_steps", "2"),
            ("ss_max_train_steps", "4"),
            ("ss_seed", "42"),
            ("ss_base_model_version", "sd_v1"),
            ("ss_network_train_unet_only", "True"),
            ("ss_resolution", "(32, 32)"),
            ("ss_training_comment", "test"),
        ] {
            assert_eq!(
                lora.metadata.get(key).map(String::as_str),
                Some(want),
                "{key}"
            );
        }
        let csv = std::fs::read_to_string(&outcome.loss_csv).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "step,loss,lr");
        assert_eq!(lines.len(), 5);
        // Warmup over 2 steps: lr 0, 5e-4, then 1e-3.
        let lrs: Vec<f64> = lines[1..]
            .iter()
            .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(lrs, [0.0, 5e-4, 1e-3, 1e-3]);
        assert!(dir.path().join("work").join(LATENT_CACHE_FILE).exists());
    }

    /// With `conv_dim` the file also holds kohya's LoCon modules under kohya's names: ResNet
    /// 3x3 convolutions and samplers at `conv_dim`/`conv_alpha`, time-embedding projections and
    /// skip convolutions at `network_dim`/`network_alpha`; `ss_network_args` records the
    /// options. The run resumes exactly like a plain one.
    #[test]
    fn a_locon_run_writes_kohyas_conv_modules() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = setup(dir.path(), 3, 1);
        config.conv_dim = Some(2);
        config.conv_alpha = Some(0.5);
        let whole = run(&config, &dir.path().join("w0"), &dir.path().join("o0")).unwrap();
        let lora = slider_lora::Lora::load(&whole.lora).unwrap();
        let conv3 = slider_lora::ModuleKind::Conv { kh: 3, kw: 3 };
        // (name, kind, rank, alpha)
        let cases = [
            ("lora_unet_down_blocks_0_resnets_0_conv1", conv3, 2, 0.5),
            ("lora_unet_down_blocks_0_resnets_0_conv2", conv3, 2, 0.5),
            ("lora_unet_down_blocks_0_downsamplers_0_conv", conv3, 2, 0.5),
            ("lora_unet_mid_block_resnets_1_conv1", conv3, 2, 0.5),
            ("lora_unet_up_blocks_1_upsamplers_0_conv", conv3, 2, 0.5),
            (
                "lora_unet_up_blocks_2_resnets_1_conv_shortcut",
                slider_lora::ModuleKind::Conv { kh: 1, kw: 1 },
                4,
                1.0,
            ),
            (
                "lora_unet_down_blocks_1_resnets_0_time_emb_proj",
                slider_lora::ModuleKind::Linear,
                4,
                1.0,
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in",
                slider_lora::ModuleKind::Conv { kh: 1, kw: 1 },
                4,
                1.0,
            ),
        ];
        for (name, kind, rank, alpha) in cases {
            let m = lora.modules.get(name);
            let m = m.unwrap_or_else(|| panic!("missing {name}"));
            assert_eq!((m.kind, m.rank, m.alpha), (kind, rank, alpha), "{name}");
            assert!(m.up.iter().any(|v| *v != 0.0), "{name} trained");
        }
        let unet = UNetConfig {
            model_channels: 32,
            context_dim: 32,
            ..UNetConfig::tiny()
        }
        .init(&Device::flex());
        let all = slider_models::lora::lora_targets(&unet).len()
            + slider_models::lora::locon_targets(&unet).len();
        assert_eq!(lora.modules.len(), all);
        assert_eq!(
            lora.metadata.get("ss_network_args").map(String::as_str),
            Some(r#"{"conv_alpha":"0.5","conv_dim":"2"}"#)
        );

        let work = dir.path().join("w1");
        let stop = AtomicBool::new(false);
        let stopped = train(
            &config,
            &work,
            &dir.path().join("o1"),
            &Device::flex(),
            |p| stop.store(p.step == 2, Ordering::Relaxed),
            &stop,
        );
        assert!(matches!(stopped, Err(TrainError::Stopped { step: 2 })));
        let resumed = run(&config, &work, &dir.path().join("o1")).unwrap();
        assert_eq!(read(&resumed.lora), read(&whole.lora));
    }

    /// The parameters a train node is sent with (the JSON the recipe serialises, read back
    /// by serde) become the config; inputs resolve through the request's map.
    #[test]
    fn node_parameters_become_a_config() {
        let json = serde_json::json!({
            "kind": "train", "base": {"File": "/m/base.safetensors"},
            "images": [{"Node": "render"}, {"File": "/i/b.png"}],
            "caption": "sks", "learning_rate": 5e-5, "unet_lr": null, "train_batch_size": 1,
            "max_train_steps": 400, "network_dim": 4, "network_alpha": 1.0, "conv_dim": 4,
            "conv_alpha": 2.0, "network_train_unet_only": true,
            "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 20,
            "optimizer_type": "CAME", "optimizer_args": {"weight_decay": "0.04"}, "seed": 7,
            "resolution": 512, "noise_offset": 0.0, "min_snr_gamma": null,
            "mixed_precision": "fp16", "gradient_checkpointing": true, "save_precision": "fp16",
            "checkpoint_every": 50, "training_comment": "eyes"
        });
        let slider_protocol::params::NodeParams::Train(mut params) =
            serde_json::from_value(json).unwrap()
        else {
            panic!("not a train node");
        };
        let resolve = |input: &Input| match input {
            Input::File(f) => Some(f.clone()),
            Input::Node(n) => Some(PathBuf::from(format!("/store/{n}.png"))),
        };
        let c = TrainConfig::from_params(&params, resolve).unwrap();
        assert_eq!(c.base, PathBuf::from("/m/base.safetensors"));
        assert_eq!(
            c.images,
            [
                PathBuf::from("/store/render.png"),
                PathBuf::from("/i/b.png")
            ]
        );
        assert_eq!(
            (c.network_dim, c.max_train_steps, c.seed, c.resolution),
            (4, 400, 7, 512)
        );
        assert_eq!((c.unet_lr, c.min_snr_gamma), (None, None));
        assert_eq!((c.conv_dim, c.conv_alpha), (Some(4), Some(2.0)));
        assert_eq!(c.optimizer_args["weight_decay"], "0.04");
        assert_eq!(
            (c.optimizer_type, c.lr_scheduler, c.save_precision),
            (
                OptimizerName::Came,
                LrScheduler::ConstantWithWarmup,
                Precision::Fp16
            )
        );
        assert_eq!(c.comment, "eyes");
        // An input without a file, and text-encoder training, are refused.
        assert!(TrainConfig::from_params(&params, |_| None).is_err());
        params.network_train_unet_only = false;
        let err = TrainConfig::from_params(&params, resolve).unwrap_err();
        assert!(err.to_string().contains("text-encoder"), "{err}");
    }

    /// Every optimizer and schedule name the recipe accepts builds its optimizer and schedule.
    #[test]
    fn every_optimizer_and_schedule_name_builds() {
        for name in OptimizerName::ALL {
            Optimizer::from_kohya(name.name(), &BTreeMap::new()).unwrap();
        }
        for name in LrScheduler::ALL {
            let kind = ScheduleKind::from_name(name.name()).unwrap();
            LrSchedule::new(kind, 1e-4, 0, 10).unwrap();
        }
    }

    #[test]
    fn settings_that_cannot_train_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = setup(dir.path(), 1, 0);
        type Edit = fn(&mut TrainConfig);
        let cases: [(&str, Edit); 4] = [
            ("no images", |c| c.images.clear()),
            ("resolution", |c| c.resolution = 30),
            ("batch", |c| c.train_batch_size = 0),
            ("optimizer args", |c| {
                c.optimizer_args.insert("momentum".into(), "0.9".into());
            }),
        ];
        for (label, edit) in cases {
            let mut c = good.clone();
            edit(&mut c);
            assert!(
                run(&c, &dir.path().join(label), &dir.path().join("o")).is_err(),
                "{label}"
            );
        }
    }

    /// Stopping cleanly after step k and running again gives the bytes of an uninterrupted run,
    /// in f32 and with the frozen model in fp16 (whose loss scale is in the checkpoint) and
    /// bf16 (with recomputation).
    #[test]
    fn a_stopped_and_resumed_run_equals_an_uninterrupted_one() {
        for (mixed_precision, gradient_checkpointing) in [
            (MixedPrecision::No, false),
            (MixedPrecision::Fp16, false),
            (MixedPrecision::Bf16, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let config = TrainConfig {
                mixed_precision,
                gradient_checkpointing,
                ..setup(dir.path(), 5, 2)
            };
            stop_and_resume_exactly(dir.path(), &config);
        }
    }

    fn stop_and_resume_exactly(dir: &Path, config: &TrainConfig) {
        let whole = run(config, &dir.join("w0"), &dir.join("o0")).unwrap();
        for stop_after in [1, 2, 4] {
            let work = dir.join(format!("w{stop_after}"));
            let out = dir.join(format!("o{stop_after}"));
            let stop = AtomicBool::new(false);
            let err = train(
                config,
                &work,
                &out,
                &Device::flex(),
                |p| {
                    if p.step == stop_after {
                        stop.store(true, Ordering::Relaxed);
                    }
                },
                &stop,
            )
            .unwrap_err();
            assert!(
                matches!(err, TrainError::Stopped { step } if step == stop_after),
                "{err}"
            );
            let resumed = run(config, &work, &out).unwrap();
            assert_eq!(resumed.resumed_from, stop_after);
            assert_eq!(
                read(&resumed.lora),
                read(&whole.lora),
                "stopped after {stop_after}"
            );
            assert_eq!(read(&resumed.loss_csv), read(&whole.loss_csv));
        }
        let mut other = config.clone();
        other.seed = 1;
        let err = run(&other, &dir.join("w1"), &dir.join("o")).unwrap_err();
        assert!(matches!(err, TrainError::Resume { .. }), "{err}");
    }

    /// `gradient_checkpointing` changes the memory, not the training: the same loss at every
    /// step as without it, up to the order of the gradient sums (LoCon modules included, batch
    /// 2). The factors themselves are not compared: a factor whose gradient is zero in exact
    /// arithmetic (a per-channel shift before a one-channel-per-group GroupNorm) is moved by
    /// CAME's normalised step on rounding noise, differently in any two summation orders.
    #[test]
    fn recomputation_trains_what_the_plain_backward_trains() {
        let dir = tempfile::tempdir().unwrap();
        let plain = TrainConfig {
            conv_dim: Some(2),
            conv_alpha: Some(1.0),
            ..setup(dir.path(), 4, 4)
        };
        let recomputed = TrainConfig {
            gradient_checkpointing: true,
            ..plain.clone()
        };
        let a = run(&plain, &dir.path().join("w0"), &dir.path().join("o0")).unwrap();
        let b = run(&recomputed, &dir.path().join("w1"), &dir.path().join("o1")).unwrap();
        for (x, y) in losses(&a.loss_csv).iter().zip(losses(&b.loss_csv)) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "loss {x} vs {y}");
        }
    }

    /// `mixed_precision: fp16` and `bf16` train what f32 trains: every step's loss within 2 %
    /// of the f32 run's (the losses are of the same noise draws; the factors drift apart by
    /// rounding), and the LoRA is kohya's, with the precision in its metadata.
    #[test]
    fn half_precision_trains_what_f32_trains() {
        let dir = tempfile::tempdir().unwrap();
        let f32_run = setup(dir.path(), 6, 0);
        let reference = run(&f32_run, &dir.path().join("w"), &dir.path().join("o")).unwrap();
        let want = losses(&reference.loss_csv);
        for (precision, gradient_checkpointing) in
            [(MixedPrecision::Fp16, false), (MixedPrecision::Bf16, true)]
        {
            let config = TrainConfig {
                mixed_precision: precision,
                gradient_checkpointing,
                ..f32_run.clone()
            };
            let name = precision.name();
            let out = run(
                &config,
                &dir.path().join(format!("w-{name}")),
                &dir.path().join(format!("o-{name}")),
            )
            .unwrap();
            let got = losses(&out.loss_csv);
            assert_eq!(got.len(), want.len());
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs() / w.abs())
                .fold(0f64, f64::max);
            println!("{name}: losses within {worst:e} of f32's");
            assert!(worst <= 2e-2, "{name}: a loss differs by {worst:e}");
            let lora = slider_lora::Lora::load(&out.lora).unwrap();
            assert_eq!(
                lora.metadata.get("ss_mixed_precision").map(String::as_str),
                Some(name)
            );
            // The steps were taken (not all skipped for overflow): `up` starts at zero.
            let moved = lora
                .modules
                .values()
                .filter(|m| m.up.iter().any(|v| *v != 0.0));
            assert_eq!(
                moved.count(),
                lora.modules.len(),
                "{name}: untrained modules"
            );
        }
    }

    /// The body of the child process [`killed_runs_resume_exactly`] kills (it runs this
    /// ignored test by name, with the directory in the environment).
    #[test]
    #[ignore = "the child process of killed_runs_resume_exactly"]
    fn child_training_run() {
        let dir = PathBuf::from(
            std::env::var_os(CHILD_DIR).expect("run by killed_runs_resume_exactly, which sets it"),
        );
        let config: TrainConfig = serde_json::from_slice(&read(&dir.join("config.json"))).unwrap();
        run(&config, &dir.join("work"), &dir.join("out")).unwrap();
    }

    fn checkpoint_step(work: &Path) -> usize {
        ResumeState::step_of(&work.join(CHECKPOINT_FILE)).unwrap_or(0)
    }

    /// SIGKILL at several points of a run (a child process of this test binary), then resume:
    /// the LoRA equals the uninterrupted run's byte for byte.
    #[cfg(unix)]
    #[test]
    fn killed_runs_resume_exactly() {
        for gradient_checkpointing in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = TrainConfig {
                gradient_checkpointing,
                ..setup(dir.path(), 6, 1)
            };
            kill_and_resume_exactly(dir.path(), &config);
        }
    }

    fn kill_and_resume_exactly(dir: &Path, config: &TrainConfig) {
        let whole = run(config, &dir.join("w0"), &dir.join("o0")).unwrap();
        std::fs::write(dir.join("config.json"), serde_json::to_vec(config).unwrap()).unwrap();
        let exe = std::env::current_exe().unwrap();
        for kill_after in [1, 3, 4] {
            let work = dir.join("work");
            let _ = std::fs::remove_dir_all(&work);
            let mut child = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "tests::child_training_run",
                    "--ignored",
                    "--test-threads=1",
                ])
                .env(CHILD_DIR, dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let started = std::time::Instant::now();
            while checkpoint_step(&work) < kill_after {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "the child ended before step {kill_after}"
                );
                assert!(
                    started.elapsed().as_secs() < 120,
                    "no checkpoint after 120 s"
                );
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let at = checkpoint_step(&work);
            assert!(at >= kill_after && at < 6, "killed at checkpoint {at}");
            let resumed = run(config, &work, &dir.join("out")).unwrap();
            assert_eq!(resumed.resumed_from, at);
            assert_eq!(
                read(&resumed.lora),
                read(&whole.lora),
                "killed after checkpoint {at}"
            );
        }
    }
}

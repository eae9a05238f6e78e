//! Pretraining a small Stable Diffusion base model from scratch on a captioned corpus, so the
//! whole slider method runs on a laptop with nothing to download. Two stages, both resumable:
//!
//! 1. the autoencoder (L1 + MSE reconstruction, a small KL term), after which the latent scale
//!    is folded into it so SD1's factor 0.18215 gives unit-variance latents
//!    ([`latent_scale`]);
//! 2. the UNet and the CLIP text encoder together: epsilon prediction over SD's scaled-linear
//!    DDPM schedule, with captions dropped (replaced by the empty caption) so classifier-free
//!    guidance works.
//!
//! Everything random (initial weights, batches, timesteps, noise, caption dropout) is drawn
//! from `seed` and the step number, so a run stopped at any checkpoint and resumed equals an
//! uninterrupted one. The result is written in the SD1 single-file layout that
//! [`StableDiffusion::load`] reads.
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use slider_pretrain::{Corpus, PretrainConfig, pretrain};
//! use slider_models::burn::tensor::Device;
//!
//! let device = Device::flex();
//! let corpus = Corpus::load("corpus".as_ref(), &device)?;
//! let config = PretrainConfig::default();
//! let stop = AtomicBool::new(false);
//! let done = pretrain(&config, &corpus, "work".as_ref(), "tiny-sd.safetensors".as_ref(),
//!     &device, |_progress| {}, &stop)?;
//! println!("losses in {}", done.loss_csv.display());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod caption_gain;
pub mod corpus;
pub mod latent_scale;
pub mod params;
pub mod preview;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use caption_gain::CaptionGain;
pub use corpus::Corpus;
pub use preview::PreviewConfig;

use params::NamedGrads;
use slider_models::HostTensor;
use slider_models::checkpoint::{CheckpointError, Family, ModelSpec, StableDiffusion, StoreDtype};
use slider_models::clip::{Activation, ClipTextModel, TextConfig};
use slider_models::ddpm::{DdpmError, NoiseSchedule, standard_normal};
use slider_models::tokenizer::{Padding, Tokenizer};
use slider_models::unet::{Heads, UNet, UNetConfig};
use slider_models::vae::{SD1_SCALING_FACTOR, Vae, VaeConfig};
use slider_optim::{
    AdamW, AdamWConfig, LrSchedule, OptimizerError, OptimizerState, ResumeError, ResumeState,
    ScheduleError, ScheduleKind,
};

/// The resumable state in the work dir.
pub const STATE_FILE: &str = "pretrain-state.safetensors";
/// Per-step losses in the work dir: `stage,step,loss,lr`.
pub const LOSS_FILE: &str = "loss.csv";
/// The autoencoder's reconstructions of the corpus's first images, in the work dir (top row
/// originals), written when the autoencoder stage ends and again at the end of the run.
pub const RECONSTRUCTIONS_FILE: &str = "vae-reconstructions.png";

/// Why pretraining failed.
#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    /// Settings that cannot train.
    #[error("{0}")]
    Config(String),
    /// The corpus folder is unusable.
    #[error("{path}: {message}")]
    Corpus {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The state in the work dir is damaged or from other settings.
    #[error("{path}: cannot resume: {message}")]
    Resume {
        /// The state file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The loss is not finite.
    #[error("the {stage} loss is {loss} at step {step}")]
    Diverged {
        /// Which stage.
        stage: Stage,
        /// The step.
        step: usize,
        /// The loss.
        loss: f32,
    },
    /// The run was asked to stop; the state at `step` of `stage` was written.
    #[error("stopped at step {step} of the {stage} stage; the state was saved")]
    Stopped {
        /// The stage.
        stage: Stage,
        /// Steps done in it.
        step: usize,
    },
    /// Writing the model failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// An optimizer error.
    #[error(transparent)]
    Optimizer(#[from] OptimizerError),
    /// A learning-rate schedule error.
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// A noise-schedule error.
    #[error(transparent)]
    Ddpm(#[from] DdpmError),
}

/// The two stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The autoencoder.
    Vae,
    /// The UNet with the text encoder.
    Unet,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Vae => "vae",
            Stage::Unet => "unet",
        })
    }
}

/// Widths of the base model. The block structure is fixed: the UNet is `UNetConfig::tiny()`'s
/// (channel_mult [1, 2, 2], one res block, attention at the first two levels and the middle),
/// so kohya LoRA names equal the tiny layout; the VAE's levels (`vae_ch_mult`, three by
/// default: 4x downsampling) may differ in width.
///
/// Known limit of narrow widths: SD's GroupNorm has 32 groups, and with one or two channels
/// per group it removes (nearly) all of a feature's spatial mean, which is how flat colour
/// travels. Measured: a 32-channel VAE does not learn eight solid-colour 16 px images in 100
/// steps (mean absolute error 0.24 on [-1, 1]); 64 channels do (0.04). Wider is not simply
/// better at this budget: in the same 100-step test ch 128 gave 0.22 and ch_mult [1, 2, 4]
/// 0.36, and on the toy corpus [1, 2, 4] followed the same loss curve as [1, 1, 1] at twice
/// the cost per step (`docs/pretrain.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TinyBase {
    /// UNet `model_channels` (a multiple of 32: GroupNorm uses 32 groups).
    pub unet_channels: usize,
    /// UNet attention heads (one: burn's CPU attention costs per head, and a model this
    /// small gains nothing from more).
    pub unet_heads: usize,
    /// VAE `ch` (a multiple of 32).
    pub vae_channels: usize,
    /// VAE width multipliers per level (`ch_mult`); `len - 1` halvings, so three entries
    /// give SD1-style 4x-downsampled latents of a 64 px image at 16x16.
    pub vae_ch_mult: Vec<usize>,
    /// CLIP width (the UNet's `context_dim`).
    pub text_width: usize,
    /// CLIP layers.
    pub text_layers: usize,
    /// CLIP heads.
    pub text_heads: usize,
    /// CLIP MLP width.
    pub text_mlp: usize,
}

impl Default for TinyBase {
    fn default() -> Self {
        Self {
            unet_channels: 64,
            unet_heads: 1,
            vae_channels: 64,
            vae_ch_mult: vec![1, 1, 1],
            text_width: 64,
            text_layers: 2,
            text_heads: 2,
            text_mlp: 256,
        }
    }
}

impl TinyBase {
    /// Half the widths and one text layer: the model the unit tests train in seconds.
    #[cfg(test)]
    pub(crate) fn small_test() -> Self {
        Self {
            unet_channels: 32,
            unet_heads: 2,
            vae_channels: 32,
            vae_ch_mult: vec![1, 1, 1],
            text_width: 32,
            text_layers: 1,
            text_heads: 2,
            text_mlp: 64,
        }
    }

    /// The checkpoint architecture: SD1 family, CLIP-L layout with the full 49408-token
    /// vocabulary (so CLIP's tokenizer works unchanged) and 77 positions.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            family: Family::Sd1,
            unet: UNetConfig {
                model_channels: self.unet_channels,
                heads: Heads::Count(self.unet_heads),
                context_dim: self.text_width,
                ..UNetConfig::tiny()
            },
            vae: Some(VaeConfig {
                in_channels: 3,
                ch: self.vae_channels,
                ch_mult: self.vae_ch_mult.clone(),
                num_res_blocks: 1,
                z_channels: 4,
                norm_num_groups: 32,
            }),
            text_l: Some(TextConfig {
                vocab_size: 49408,
                hidden: self.text_width,
                layers: self.text_layers,
                heads: self.text_heads,
                intermediate: self.text_mlp,
                max_positions: 77,
                activation: Activation::QuickGelu,
                projection_dim: None,
            }),
            text_g: None,
        }
    }
}

/// Settings of a pretraining run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// Model widths.
    pub model: TinyBase,
    /// Source of everything random.
    pub seed: u64,
    /// Autoencoder steps.
    pub vae_steps: usize,
    /// UNet + text encoder steps.
    pub unet_steps: usize,
    /// Images per autoencoder step.
    pub vae_batch_size: usize,
    /// Images per UNet step.
    pub batch_size: usize,
    /// The autoencoder trains on random `vae_crop` x `vae_crop` crops, or on whole images
    /// when 0. Crops cost less per step but teach colour badly: GroupNorm's statistics over a
    /// crop are not those over the whole image it later encodes (measured: after 100 steps,
    /// mean absolute error 0.283 with 32 px crops, 0.255 whole, and only the whole-image
    /// reconstructions kept saturated colours).
    pub vae_crop: usize,
    /// Peak learning rate of the autoencoder (AdamW, warmup then cosine).
    pub vae_lr: f64,
    /// Peak learning rate of the UNet and text encoder.
    pub lr: f64,
    /// Linear warmup steps of each stage.
    pub warmup_steps: usize,
    /// Weight of the KL term (per latent element, next to per-pixel L1 + MSE).
    pub kl_weight: f64,
    /// Probability of training on the empty caption.
    pub caption_dropout: f64,
    /// Min-SNR loss weighting of the UNet stage (Hang et al. 2023): each sample's loss is
    /// weighted by `min(SNR(t), gamma) / SNR(t)`, so the many nearly-clean timesteps stop
    /// dominating the gradient; `None` weights every timestep equally.
    pub min_snr_gamma: Option<f64>,
    /// Gradients are clipped to this global L2 norm.
    pub max_grad_norm: f64,
    /// Save the state every this many steps (0: only when stopped).
    #[serde(skip)]
    pub checkpoint_every: usize,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            model: TinyBase::default(),
            seed: 0,
            vae_steps: 500,
            unet_steps: 2000,
            vae_batch_size: 4,
            batch_size: 8,
            vae_crop: 0,
            vae_lr: 1e-3,
            lr: 1e-3,
            warmup_steps: 50,
            kl_weight: 1e-6,
            caption_dropout: 0.1,
            min_snr_gamma: Some(5.0),
            max_grad_norm: 1.0,
            checkpoint_every: 100,
        }
    }
}

/// One finished step, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// The stage.
    pub stage: Stage,
    /// Steps done in it (1-based).
    pub step: usize,
    /// Steps of the stage.
    pub total: usize,
    /// This step's loss.
    pub loss: f32,
}

/// What a finished run wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainOutcome {
    /// The base model.
    pub model: PathBuf,
    /// `stage,step,loss,lr` of every step.
    pub loss_csv: PathBuf,
    /// Latent std of the trained autoencoder before the scale was folded in.
    pub latent_std: f64,
    /// Mean absolute error of the autoencoder on the corpus's first images (pixels in
    /// [-1, 1]), shown in [`RECONSTRUCTIONS_FILE`].
    pub reconstruction_error: f32,
    /// The reconstructions picture.
    pub reconstructions: PathBuf,
    /// Mean loss of the last 50 steps of each stage.
    pub final_vae_loss: f32,
    /// Same, UNet stage.
    pub final_unet_loss: f32,
    /// How much the right caption lowers the UNet's loss ([`caption_gain`]).
    pub caption_gain: CaptionGain,
}

/// The parts being trained.
struct Parts {
    vae: Vae,
    unet: UNet,
    text: ClipTextModel,
}

/// Where a run is.
struct RunState {
    stage: Stage,
    step: usize,
    latent_std: f64,
    /// (stage, loss, lr) per step done.
    losses: Vec<(Stage, f32, f64)>,
}

/// Trains (or resumes from `work_dir`) the base model `config` describes on `corpus` and
/// writes it to `out` (f16, SD1 single-file layout) and the losses to `work_dir/loss.csv`.
/// `progress` is called after every step; when `stop` turns true the state is saved and
/// [`PretrainError::Stopped`] returned.
pub fn pretrain(
    config: &PretrainConfig,
    corpus: &Corpus,
    work_dir: &Path,
    out: &Path,
    device: &Device,
    mut progress: impl FnMut(Progress),
    stop: &AtomicBool,
) -> Result<PretrainOutcome, PretrainError> {
    check(config, corpus)?;
    let spec = config.model.spec();
    // The step counts stay out of the resume check: a run may be extended or cut short (the
    // cosine schedule then follows the new total from the step it resumes at).
    let fingerprint = PretrainConfig {
        vae_steps: 0,
        unet_steps: 0,
        ..config.clone()
    };
    let config_json =
        serde_json::to_string(&fingerprint).map_err(|e| PretrainError::Config(e.to_string()))?;
    let state_path = work_dir.join(STATE_FILE);
    std::fs::create_dir_all(work_dir).map_err(|source| PretrainError::Io {
        path: work_dir.to_path_buf(),
        source,
    })?;
    let adamw = AdamWConfig::default();

    let fresh = fresh_parts(&spec, config.seed, device);
    let (mut parts, mut optimizer, mut run) = match load_state(&state_path, &config_json)? {
        Some((mut values, state, run)) => {
            tracing::info!(stage = %run.stage, step = run.step, "resuming pretraining");
            let damaged = |message: String| PretrainError::Resume {
                path: state_path.clone(),
                message,
            };
            let parts = Parts {
                vae: params::load_named(fresh.vae, "vae", &mut values).map_err(damaged)?,
                unet: params::load_named(fresh.unet, "unet", &mut values).map_err(damaged)?,
                text: params::load_named(fresh.text, "text", &mut values).map_err(damaged)?,
            };
            (parts, AdamW::from_state(adamw, &state, device)?, run)
        }
        None => (
            fresh,
            AdamW::new(adamw),
            RunState {
                stage: Stage::Vae,
                step: 0,
                latent_std: 0.0,
                losses: Vec::new(),
            },
        ),
    };
    let save = |parts: &Parts, optimizer: &AdamW, run: &RunState| {
        save_state(&state_path, &config_json, parts, optimizer, run)?;
        write_losses(&work_dir.join(LOSS_FILE), &run.losses)
    };

    if run.stage == Stage::Vae {
        let schedule = LrSchedule::new(
            ScheduleKind::Cosine,
            config.vae_lr,
            config.warmup_steps.min(config.vae_steps),
            config.vae_steps,
        )?;
        while run.step < config.vae_steps {
            if stop.load(Ordering::Relaxed) {
                save(&parts, &optimizer, &run)?;
                return Err(PretrainError::Stopped {
                    stage: Stage::Vae,
                    step: run.step,
                });
            }
            let lr = schedule.lr_at(run.step);
            let (vae, loss) = vae_step(config, corpus, parts.vae, run.step, &mut optimizer, lr)?;
            parts.vae = vae;
            run.step += 1;
            run.losses.push((Stage::Vae, loss, lr));
            progress(Progress {
                stage: Stage::Vae,
                step: run.step,
                total: config.vae_steps,
                loss,
            });
            if config.checkpoint_every > 0 && run.step.is_multiple_of(config.checkpoint_every) {
                save(&parts, &optimizer, &run)?;
            }
        }
        let sample = corpus.len().min(512);
        let std =
            latent_scale::latent_std(&parts.vae, &corpus.images.clone().narrow(0, 0, sample), 16);
        if !(std.is_finite() && std > 0.0) {
            return Err(PretrainError::Config(format!(
                "the trained autoencoder's latents have std {std}"
            )));
        }
        let k = 1.0 / (f64::from(SD1_SCALING_FACTOR) * std);
        tracing::info!(
            latent_std = std,
            scale = k,
            "folding the latent scale into the VAE"
        );
        parts.vae = latent_scale::fold_latent_scale(parts.vae, k as f32);
        let error = preview::write_reconstructions(
            &parts.vae,
            &corpus.images,
            &work_dir.join(RECONSTRUCTIONS_FILE),
        )?;
        tracing::info!(
            mean_absolute_error = error,
            "autoencoder reconstructions written"
        );
        run.latent_std = std;
        run.stage = Stage::Unet;
        run.step = 0;
        optimizer = AdamW::new(adamw);
        save(&parts, &optimizer, &run)?;
    }

    let latents = encode_corpus(&parts.vae, &corpus.images, 16);
    let tokenizer = Tokenizer::clip().map_err(|e| PretrainError::Config(e.to_string()))?;
    let captions: Vec<Vec<i64>> = corpus
        .captions
        .iter()
        .map(|c| token_ids(&tokenizer, c))
        .collect();
    let empty = token_ids(&tokenizer, "");
    let schedule = LrSchedule::new(
        ScheduleKind::Cosine,
        config.lr,
        config.warmup_steps.min(config.unet_steps),
        config.unet_steps,
    )?;
    let noise_schedule = NoiseSchedule::stable_diffusion();
    while run.step < config.unet_steps {
        if stop.load(Ordering::Relaxed) {
            save(&parts, &optimizer, &run)?;
            return Err(PretrainError::Stopped {
                stage: Stage::Unet,
                step: run.step,
            });
        }
        let lr = schedule.lr_at(run.step);
        let batch = UnetBatch::draw(config, run.step, &latents, &captions, &empty, device);
        let (unet, text, loss) = unet_step(
            config,
            parts.unet,
            parts.text,
            batch,
            &noise_schedule,
            &mut optimizer,
            lr,
            run.step,
        )?;
        parts.unet = unet;
        parts.text = text;
        run.step += 1;
        run.losses.push((Stage::Unet, loss, lr));
        progress(Progress {
            stage: Stage::Unet,
            step: run.step,
            total: config.unet_steps,
            loss,
        });
        if config.checkpoint_every > 0 && run.step.is_multiple_of(config.checkpoint_every) {
            save(&parts, &optimizer, &run)?;
        }
    }
    save(&parts, &optimizer, &run)?;
    let caption_gain = caption_gain::measure(
        &parts.unet,
        &parts.text,
        &latents,
        &captions,
        &noise_schedule,
        config.batch_size,
    )?;
    tracing::info!(
        own = caption_gain.own,
        other = caption_gain.other,
        gain = caption_gain.gain(),
        "denoising loss with the right caption and with another image's"
    );

    let model = StableDiffusion {
        spec,
        unet: parts.unet,
        vae: Some(parts.vae),
        text_l: Some(parts.text),
        text_g: None,
    };
    model.save(out, StoreDtype::F16)?;
    let reconstructions = work_dir.join(RECONSTRUCTIONS_FILE);
    let reconstruction_error = match &model.vae {
        Some(vae) => preview::write_reconstructions(vae, &corpus.images, &reconstructions)?,
        None => f32::NAN,
    };
    let tail = |stage: Stage| {
        let v: Vec<f32> = run
            .losses
            .iter()
            .filter(|(s, _, _)| *s == stage)
            .map(|(_, l, _)| *l)
            .collect();
        let tail = &v[v.len().saturating_sub(50)..];
        tail.iter().sum::<f32>() / tail.len().max(1) as f32
    };
    Ok(PretrainOutcome {
        model: out.to_path_buf(),
        loss_csv: work_dir.join(LOSS_FILE),
        latent_std: run.latent_std,
        reconstruction_error,
        reconstructions,
        final_vae_loss: tail(Stage::Vae),
        final_unet_loss: tail(Stage::Unet),
        caption_gain,
    })
}

/// CLIP token ids of `caption`, padded with the end token to 77, as the text encoder takes them.
fn token_ids(tokenizer: &Tokenizer, caption: &str) -> Vec<i64> {
    tokenizer
        .tokenize(caption, Padding::EndToken)
        .into_iter()
        .map(i64::from)
        .collect()
}

fn check(config: &PretrainConfig, corpus: &Corpus) -> Result<(), PretrainError> {
    let bad = |m: String| Err(PretrainError::Config(m));
    let m = &config.model;
    if m.unet_channels == 0 || !m.unet_channels.is_multiple_of(32) {
        return bad(format!(
            "unet channels {} must be a multiple of 32",
            m.unet_channels
        ));
    }
    if m.vae_channels == 0 || !m.vae_channels.is_multiple_of(32) {
        return bad(format!(
            "vae channels {} must be a multiple of 32",
            m.vae_channels
        ));
    }
    if m.vae_ch_mult.is_empty() || m.vae_ch_mult.len() > 4 || m.vae_ch_mult.contains(&0) {
        return bad(format!(
            "vae ch_mult {:?} must have 1 to 4 entries, none zero",
            m.vae_ch_mult
        ));
    }
    if m.unet_heads == 0 || !m.unet_channels.is_multiple_of(m.unet_heads) {
        return bad(format!(
            "{} unet heads do not divide {} channels",
            m.unet_heads, m.unet_channels
        ));
    }
    if m.text_heads == 0 || !m.text_width.is_multiple_of(m.text_heads) {
        return bad(format!(
            "{} text heads do not divide width {}",
            m.text_heads, m.text_width
        ));
    }
    if config.batch_size == 0 || config.vae_batch_size == 0 {
        return bad("batch sizes must be at least 1".into());
    }
    if config
        .min_snr_gamma
        .is_some_and(|g| !(g.is_finite() && g > 0.0))
    {
        return bad(format!(
            "min-SNR gamma {:?} must be a positive number",
            config.min_snr_gamma
        ));
    }
    if !(0.0..1.0).contains(&config.caption_dropout) {
        return bad(format!(
            "caption dropout {} is not in [0, 1)",
            config.caption_dropout
        ));
    }
    if config.vae_crop > 0 && !config.vae_crop.is_multiple_of(16) {
        return bad(format!(
            "vae crop {} must be a multiple of 16",
            config.vae_crop
        ));
    }
    if !corpus.size.is_multiple_of(16) {
        return bad(format!(
            "corpus images are {0}x{0}; the side must be a multiple of 16",
            corpus.size
        ));
    }
    Ok(())
}

/// The autoencoder's posterior starts narrow (std e^-3 = 0.05): with PyTorch's default init
/// its log-variance would start near 0, the sampled latents would be mostly noise, and the
/// decoder would learn only the average colour before the encoder could fight the noise down.
const INITIAL_LOG_VARIANCE: f32 = -6.0;

fn unet_zero_init(name: &str) -> bool {
    name == "unet.out.2.weight"
        || name == "unet.out.2.bias"
        || name.ends_with(".out_layers.3.weight")
        || name.ends_with(".proj_out.weight")
}

fn fresh_parts(spec: &ModelSpec, seed: u64, device: &Device) -> Parts {
    let never = |_: &str| false;
    let vae = spec.vae.as_ref().map(|c| c.init(device));
    let text = spec.text_l.as_ref().map(|c| c.init_hf(device));
    let vae = params::init_seeded(
        vae.unwrap_or_else(|| VaeConfig::tiny().init(device)),
        "vae",
        seed,
        never,
    );
    Parts {
        vae: latent_scale::start_log_variance(vae, INITIAL_LOG_VARIANCE),
        unet: params::init_seeded(spec.unet.init(device), "unet", seed, unet_zero_init),
        text: params::init_seeded(
            text.unwrap_or_else(|| TextConfig::clip_l().init_hf(device)),
            "text",
            seed,
            never,
        ),
    }
}

fn step_rng(seed: u64, stage: Stage, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let stage_bits = match stage {
        Stage::Vae => 1u64,
        Stage::Unet => 2,
    };
    rng.set_stream((stage_bits << 40) | step as u64);
    rng
}

fn indices(rng: &mut ChaCha8Rng, n: usize, batch: usize, device: &Device) -> Tensor<1, Int> {
    let idx: Vec<i64> = (0..batch).map(|_| rng.random_range(0..n) as i64).collect();
    Tensor::from_data(TensorData::new(idx, [batch]), device)
}

fn vae_step(
    config: &PretrainConfig,
    corpus: &Corpus,
    vae: Vae,
    step: usize,
    optimizer: &mut AdamW,
    lr: f64,
) -> Result<(Vae, f32), PretrainError> {
    let device = corpus.images.device();
    let mut rng = step_rng(config.seed, Stage::Vae, step);
    let b = config.vae_batch_size;
    let mut x = corpus
        .images
        .clone()
        .select(0, indices(&mut rng, corpus.len(), b, &device));
    let crop = config.vae_crop;
    if crop > 0 && crop < corpus.size {
        // Offsets on the latent grid (multiples of 4), one per step.
        let cells = (corpus.size - crop) / 4 + 1;
        let (y, x0) = (
            4 * rng.random_range(0..cells),
            4 * rng.random_range(0..cells),
        );
        x = x.narrow(2, y, crop).narrow(3, x0, crop);
    }
    let vae = params::tracked(vae);
    let (mean, logvar) = vae.encode(x.clone());
    let eps = standard_normal(&mut rng, mean.dims(), &device);
    let z = mean.clone() + (logvar.clone() * 0.5).exp() * eps;
    let recon = vae.decode(z);
    let diff = recon - x;
    let rec = diff.clone().abs().mean() + diff.square().mean();
    let kl = (mean.square() + logvar.clone().exp() - logvar.add_scalar(1.0)).mean() * 0.5;
    let loss = rec + kl.mul_scalar(config.kl_weight);
    let mut grads = loss.backward();
    let value = loss.into_scalar::<f32>();
    if !value.is_finite() {
        return Err(PretrainError::Diverged {
            stage: Stage::Vae,
            step: step + 1,
            loss: value,
        });
    }
    let mut named = NamedGrads::new();
    params::take_grads(&vae, "vae", &mut grads, &mut named)?;
    params::clip_grad_norm(&mut named, config.max_grad_norm);
    let vae = params::adamw_step(vae, "vae", &mut named, optimizer, lr)?;
    Ok((vae, value))
}

/// Scaled latents (`mean * 0.18215`) of every image, `[n, 4, h/4, w/4]`.
fn encode_corpus(vae: &Vae, images: &Tensor<4>, batch: usize) -> Tensor<4> {
    let [n, ..] = images.dims();
    let chunks: Vec<Tensor<4>> = (0..n)
        .step_by(batch)
        .map(|start| {
            let len = batch.min(n - start);
            vae.encode(images.clone().narrow(0, start, len))
                .0
                .mul_scalar(SD1_SCALING_FACTOR)
        })
        .collect();
    Tensor::cat(chunks, 0)
}

/// One UNet step's inputs, all drawn from the seed and the step number.
struct UnetBatch {
    x0: Tensor<4>,
    ids: Tensor<2, Int>,
    timesteps: Vec<usize>,
    noise: Tensor<4>,
}

impl UnetBatch {
    fn draw(
        config: &PretrainConfig,
        step: usize,
        latents: &Tensor<4>,
        captions: &[Vec<i64>],
        empty: &[i64],
        device: &Device,
    ) -> Self {
        let mut rng = step_rng(config.seed, Stage::Unet, step);
        let b = config.batch_size;
        let [n, c, h, w] = latents.dims();
        let picks: Vec<usize> = (0..b).map(|_| rng.random_range(0..n)).collect();
        let idx: Vec<i64> = picks.iter().map(|&i| i as i64).collect();
        let x0 = latents
            .clone()
            .select(0, Tensor::from_data(TensorData::new(idx, [b]), device));
        let mut ids = Vec::with_capacity(b * empty.len());
        for &i in &picks {
            let dropped = rng.random::<f64>() < config.caption_dropout;
            ids.extend_from_slice(if dropped { empty } else { &captions[i] });
        }
        let len = empty.len();
        let ids = Tensor::from_data(TensorData::new(ids, [b, len]), device);
        let timesteps: Vec<usize> = (0..b).map(|_| rng.random_range(0..1000)).collect();
        let noise = standard_normal(&mut rng, [b, c, h, w], device);
        Self {
            x0,
            ids,
            timesteps,
            noise,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn unet_step(
    config: &PretrainConfig,
    unet: UNet,
    text: ClipTextModel,
    batch: UnetBatch,
    noise_schedule: &NoiseSchedule,
    optimizer: &mut AdamW,
    lr: f64,
    step: usize,
) -> Result<(UNet, ClipTextModel, f32), PretrainError> {
    let device = batch.x0.device();
    let b = batch.timesteps.len();
    let noisy = noise_schedule.add_noise(batch.x0, batch.noise.clone(), &batch.timesteps)?;
    let unet = params::tracked(unet);
    let text = params::tracked(text);
    let context = text.forward(batch.ids).last;
    let t = Tensor::<1>::from_data(
        TensorData::new(batch.timesteps.iter().map(|&t| t as f32).collect(), [b]),
        &device,
    );
    let pred = unet.forward(noisy, t, context, None);
    let per_sample = (pred - batch.noise)
        .square()
        .mean_dims(&[1, 2, 3])
        .reshape([b]);
    let loss = match config.min_snr_gamma {
        Some(gamma) => {
            let weights = batch
                .timesteps
                .iter()
                .map(|&t| noise_schedule.min_snr_weight(t, gamma as f32))
                .collect::<Result<Vec<f32>, _>>()?;
            let weights = Tensor::<1>::from_data(TensorData::new(weights, [b]), &device);
            (per_sample * weights).mean()
        }
        None => per_sample.mean(),
    };
    let mut grads = loss.backward();
    let value = loss.into_scalar::<f32>();
    if !value.is_finite() {
        return Err(PretrainError::Diverged {
            stage: Stage::Unet,
            step: step + 1,
            loss: value,
        });
    }
    let mut named = NamedGrads::new();
    params::take_grads(&unet, "unet", &mut grads, &mut named)?;
    params::take_grads(&text, "text", &mut grads, &mut named)?;
    params::clip_grad_norm(&mut named, config.max_grad_norm);
    let unet = params::adamw_step(unet, "unet", &mut named, optimizer, lr)?;
    let text = params::adamw_step(text, "text", &mut named, optimizer, lr)?;
    Ok((unet, text, value))
}

#[derive(Serialize, Deserialize)]
struct RunJson {
    stage: Stage,
    step: usize,
    latent_std: f64,
    losses: Vec<(Stage, f32, f64)>,
}

/// One [`ResumeState`]: every parameter (`vae.*`, `unet.*`, `text.*`, f32), the optimizer's
/// moments, and the run's stage, position and losses as progress.
fn save_state(
    path: &Path,
    config_json: &str,
    parts: &Parts,
    optimizer: &AdamW,
    run: &RunState,
) -> Result<(), PretrainError> {
    let tensors = params::named_values(&parts.vae, "vae")
        .into_iter()
        .chain(params::named_values(&parts.unet, "unet"))
        .chain(params::named_values(&parts.text, "text"))
        .map(|(name, shape, values)| (name, HostTensor { shape, values }))
        .collect();
    let progress = serde_json::to_string(&RunJson {
        stage: run.stage,
        step: run.step,
        latent_std: run.latent_std,
        losses: run.losses.clone(),
    })
    .map_err(|e| PretrainError::Config(e.to_string()))?;
    ResumeState {
        settings: config_json.to_owned(),
        step: run.losses.len(),
        progress,
        tensors,
        optimizer: optimizer.state(),
    }
    .write(path)
    .map_err(|e| resume_error(path, e))
}

/// Parameter values by name.
type NamedValues = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn resume_error(path: &Path, e: ResumeError) -> PretrainError {
    match e {
        ResumeError::Io { path, source } => PretrainError::Io { path, source },
        ResumeError::OtherFormat { .. } => PretrainError::Resume {
            path: path.to_path_buf(),
            message: format!(
                "{e}; finish it with the version that wrote it, or remove it to start over"
            ),
        },
        other => PretrainError::Resume {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    }
}

fn load_state(
    path: &Path,
    config_json: &str,
) -> Result<Option<(NamedValues, OptimizerState, RunState)>, PretrainError> {
    let Some(state) = ResumeState::read(path, config_json).map_err(|e| resume_error(path, e))?
    else {
        return Ok(None);
    };
    let run: RunJson =
        serde_json::from_str(&state.progress).map_err(|e| PretrainError::Resume {
            path: path.to_path_buf(),
            message: format!("its progress: {e}"),
        })?;
    let model = state
        .tensors
        .into_iter()
        .map(|(name, t)| (name, (t.shape, t.values)))
        .collect();
    Ok(Some((
        model,
        state.optimizer,
        RunState {
            stage: run.stage,
            step: run.step,
            latent_std: run.latent_std,
            losses: run.losses,
        },
    )))
}

fn write_losses(path: &Path, losses: &[(Stage, f32, f64)]) -> Result<(), PretrainError> {
    let mut csv = String::from("stage,step,loss,lr\n");
    let mut counts = [0usize; 2];
    for (stage, loss, lr) in losses {
        let i = match stage {
            Stage::Vae => 0,
            Stage::Unet => 1,
        };
        counts[i] += 1;
        csv.push_str(&format!("{stage},{},{loss},{lr}\n", counts[i]));
    }
    preview::write_atomic(path, csv.as_bytes())
}

#[cfg(test)]
mod tests;

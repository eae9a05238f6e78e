//! Node parameters: one typed struct per node kind, every field with kohya's name. The
//! recipe compiles into these types, the engine keys their canonical serialisation (a golden
//! test pins it: `crates/engine/tests/golden_keys.rs`), and the worker deserialises them.
//! Renaming a field or changing how a value serialises changes users' keys: do it on
//! purpose, with a note in docs/architecture.md.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::names::{LrScheduler, MixedPrecision, Optimizer, Sampler, Trainer};

/// A reference to something a node reads: another node's output or a file on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// The primary output of the named node.
    Node(String),
    /// A file, absolute path. Its content hash (never its path) enters the node key.
    File(PathBuf),
}

impl Input {
    /// What grids and reports call the input: the node's name, or the file's stem.
    pub fn label(&self) -> String {
        match self {
            Input::Node(node) => node.clone(),
            Input::File(path) => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
        }
    }
}

/// The kind of a node, with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeParams {
    SvdMerge(SvdMergeParams),
    Merge(MergeParams),
    Resize(ResizeParams),
    Command(CommandParams),
    Train(TrainParams),
    XyPlot(XyPlotParams),
    Evaluate(EvaluateParams),
    MergeIntoModel(MergeIntoModelParams),
}

/// Floating-point formats kohya's tools accept for `--precision` / `--save_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Float,
    Fp16,
    Bf16,
}

/// `svd_merge_lora.py`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SvdMergeParams {
    pub models: Vec<Input>,
    pub ratios: Vec<f64>,
    pub new_rank: usize,
    /// Defaults to `new_rank`.
    pub new_conv_rank: usize,
    pub precision: Precision,
    /// Defaults to `precision`.
    pub save_precision: Precision,
    /// The quantile of the clamp applied after the SVD; kohya's is 0.99. `None` = no clamp.
    pub clamp_quantile: Option<f64>,
}

/// Exact rank-concatenating merge: delta = sum ratio_i * delta_i.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeParams {
    pub models: Vec<Input>,
    pub ratios: Vec<f64>,
    pub save_precision: Precision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DynamicMethod {
    SvRatio,
    SvFro,
    SvCumulative,
}

/// Which sd-scripts version's dynamic rank rule a resize follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RankRule {
    /// sd-scripts before PR #2194: one rank past the first that reaches the target.
    #[default]
    OnePastThreshold,
    /// sd-scripts after PR #2194: the first rank that reaches the target.
    ReachThreshold,
}

impl RankRule {
    /// Whether this is the default rule (which stays out of serialized parameters, so the
    /// keys of nodes written before the rule existed do not change).
    pub fn is_default(&self) -> bool {
        *self == RankRule::default()
    }
}

/// `resize_lora.py`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResizeParams {
    pub model: Input,
    pub new_rank: usize,
    /// Defaults to `new_rank`.
    pub new_conv_rank: usize,
    pub dynamic_method: Option<DynamicMethod>,
    pub dynamic_param: Option<f64>,
    /// Only with a `dynamic_method`.
    #[serde(default, skip_serializing_if = "RankRule::is_default")]
    pub rank_rule: RankRule,
    pub save_precision: Precision,
}

/// Runs an external program. `{name}` placeholders in `run` are replaced by the paths of the
/// declared inputs and outputs; outputs are files the program must create in its work dir.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandParams {
    /// argv; the first element is the program.
    pub run: Vec<String>,
    pub inputs: BTreeMap<String, Input>,
    /// Output name -> file name inside the node's output directory. The first declared
    /// output (in recipe order) is the node's primary output.
    pub outputs: Vec<(String, String)>,
}

/// kohya `train_network.py` options (REFERENCE.md "Training").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainParams {
    pub base: Input,
    /// The base model's diffusers `config.json` (what its shapes cannot tell: GroupNorm
    /// groups, attention heads); enters the key by content. Left out of the serialisation
    /// when absent, so recipes without it keep their keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_config: Option<Input>,
    pub images: Vec<Input>,
    pub caption: String,
    pub learning_rate: f64,
    pub unet_lr: Option<f64>,
    pub train_batch_size: usize,
    pub max_train_steps: usize,
    pub network_dim: usize,
    pub network_alpha: f64,
    pub conv_dim: Option<usize>,
    pub conv_alpha: Option<f64>,
    pub network_train_unet_only: bool,
    pub lr_scheduler: LrScheduler,
    pub lr_warmup_steps: usize,
    pub optimizer_type: Optimizer,
    pub optimizer_args: BTreeMap<String, String>,
    pub seed: u64,
    pub resolution: usize,
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    pub mixed_precision: MixedPrecision,
    /// kohya's `no_half_vae`: the VAE stays f32 for the one-time encode under a half
    /// `mixed_precision`. Left out of the serialisation when false, so recipes without it
    /// keep their keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_half_vae: bool,
    pub gradient_checkpointing: bool,
    pub save_precision: Precision,
    pub checkpoint_every: usize,
    /// kohya's `training_comment`, written as `ss_training_comment`. Left out of the
    /// serialisation when empty, so recipes without it keep their keys.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub training_comment: String,
    /// Which program trains the node. Left out of the serialisation at the default (`burn`),
    /// so the keys of recipes without it do not change.
    #[serde(default, skip_serializing_if = "Trainer::is_default")]
    pub trainer: Trainer,
    /// Where sd-scripts is installed (`trainer: sd-scripts` only). Never serialised: where a
    /// program lives is not part of a key (the checkout's commit is: the engine adds it to
    /// the fingerprint), and only the engine, never a worker, runs sd-scripts.
    #[serde(skip)]
    pub sd_scripts: Option<SdScriptsInstall>,
}

/// A kohya-ss/sd-scripts installation: the checkout and the Python that runs its scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdScriptsInstall {
    /// The checkout (holds `train_network.py`, `sdxl_train_network.py`).
    pub checkout: PathBuf,
    /// The Python with torch and sd-scripts' requirements (a path, or a name on PATH).
    pub python: PathBuf,
}

/// An X/Y grid of samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XyPlotParams {
    pub base: Input,
    /// The base model's diffusers `config.json` (what its shapes cannot tell: GroupNorm
    /// groups, attention heads); enters the key by content. Left out of the serialisation
    /// when absent, so recipes without it keep their keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_config: Option<Input>,
    /// LoRAs applied to every cell (at weight 1 unless an axis varies it).
    pub loras: Vec<Input>,
    pub prompt: String,
    pub negative_prompt: String,
    pub x: Axis,
    pub y: Axis,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: Sampler,
    pub width: usize,
    pub height: usize,
    /// Each cell drawn this many times larger on the sheet (every pixel a square, nearest
    /// neighbour); 1 draws the cells at their sampled size.
    #[serde(default = "unscaled", skip_serializing_if = "is_unscaled")]
    pub cell_scale: u32,
}

fn unscaled() -> u32 {
    1
}

fn is_unscaled(scale: &u32) -> bool {
    *scale == 1
}

/// Slider quality on the toy eye-size world: for each prompt x seed x weight, sample with the
/// LoRA at that weight, measure the eyes with `meter`, and report how measured eye size
/// follows the weight (Spearman) and how much changes outside the eyes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateParams {
    pub base: Input,
    /// The base model's diffusers `config.json` (what its shapes cannot tell: GroupNorm
    /// groups, attention heads); enters the key by content. Left out of the serialisation
    /// when absent, so recipes without it keep their keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_config: Option<Input>,
    /// The slider under test.
    pub lora: Input,
    /// The eye-size meter's weights (a file, or a node that writes one).
    pub meter: Input,
    pub weights: Vec<f64>,
    pub seeds: Vec<u64>,
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub sampler: Sampler,
    pub width: usize,
    pub height: usize,
}

/// kohya's `merge_lora.py` / `sdxl_merge_lora.py` with `--sd_model`: LoRAs baked into a
/// checkpoint, `W += ratio * alpha / rank * up @ down`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeIntoModelParams {
    /// The checkpoint (a file, or a node that writes one).
    pub base: Input,
    pub models: Vec<Input>,
    pub ratios: Vec<f64>,
    /// Every float tensor stored in this precision; `None` keeps each tensor's own dtype.
    pub save_precision: Option<Precision>,
}

/// One axis of an X/Y grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "axis", content = "values", rename_all = "snake_case")]
pub enum Axis {
    /// The weight of the first LoRA.
    Weight(Vec<f64>),
    Seed(Vec<u64>),
    Prompt(Vec<String>),
    /// Which LoRA is applied (`None` = the base model alone).
    Lora(Vec<Option<Input>>),
}

impl Axis {
    /// The number of values along the axis.
    pub fn len(&self) -> usize {
        match self {
            Axis::Weight(v) => v.len(),
            Axis::Seed(v) => v.len(),
            Axis::Prompt(v) => v.len(),
            Axis::Lora(v) => v.len(),
        }
    }

    /// Whether the axis has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl NodeParams {
    /// Every input the node reads, in a stable order.
    pub fn inputs(&self) -> Vec<&Input> {
        match self {
            NodeParams::SvdMerge(p) => p.models.iter().collect(),
            NodeParams::Merge(p) => p.models.iter().collect(),
            NodeParams::Resize(p) => vec![&p.model],
            NodeParams::Command(p) => p.inputs.values().collect(),
            NodeParams::Train(p) => std::iter::once(&p.base)
                .chain(&p.base_config)
                .chain(&p.images)
                .collect(),
            NodeParams::XyPlot(p) => {
                let mut v: Vec<&Input> = std::iter::once(&p.base)
                    .chain(&p.base_config)
                    .chain(&p.loras)
                    .collect();
                for axis in [&p.x, &p.y] {
                    if let Axis::Lora(items) = axis {
                        v.extend(items.iter().flatten());
                    }
                }
                v
            }
            NodeParams::Evaluate(p) => std::iter::once(&p.base)
                .chain(&p.base_config)
                .chain([&p.lora, &p.meter])
                .collect(),
            NodeParams::MergeIntoModel(p) => std::iter::once(&p.base).chain(&p.models).collect(),
        }
    }

    /// The node's expected work, for ordering what is ready (critical path first): UNet
    /// evaluations of one image times the image's pixel count. A training step counts three
    /// evaluations per image (forward and backward), a guided sampler step two (the negative
    /// and positive halves). Only ratios between nodes mean anything. The kinds that run no
    /// UNet (merges, resizes, baking into a checkpoint) and `command` nodes, whose work
    /// cannot be known, count 0.
    pub fn work_estimate(&self) -> f64 {
        fn sampling(
            images: usize,
            steps: usize,
            cfg_scale: f64,
            width: usize,
            height: usize,
        ) -> f64 {
            let per_step = if cfg_scale > 1.0 { 2.0 } else { 1.0 };
            images as f64 * steps as f64 * per_step * width as f64 * height as f64
        }
        match self {
            NodeParams::Train(p) => {
                let side = p.resolution as f64;
                3.0 * p.max_train_steps as f64 * p.train_batch_size.max(1) as f64 * side * side
            }
            NodeParams::XyPlot(p) => sampling(
                p.x.len() * p.y.len(),
                p.steps,
                p.cfg_scale,
                p.width,
                p.height,
            ),
            NodeParams::Evaluate(p) => sampling(
                p.weights.len() * p.seeds.len() * p.prompts.len(),
                p.steps,
                p.cfg_scale,
                p.width,
                p.height,
            ),
            NodeParams::SvdMerge(_)
            | NodeParams::Merge(_)
            | NodeParams::Resize(_)
            | NodeParams::Command(_)
            | NodeParams::MergeIntoModel(_) => 0.0,
        }
    }

    /// The kind's name as written in recipes (`svd_merge`, `train`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            NodeParams::SvdMerge(_) => "svd_merge",
            NodeParams::Merge(_) => "merge",
            NodeParams::Resize(_) => "resize",
            NodeParams::Command(_) => "command",
            NodeParams::Train(_) => "train",
            NodeParams::XyPlot(_) => "xy_plot",
            NodeParams::Evaluate(_) => "evaluate",
            NodeParams::MergeIntoModel(_) => "merge_into_model",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> Input {
        Input::File(PathBuf::from(name))
    }

    #[test]
    fn work_estimates_count_unet_evaluations_times_pixels() {
        let grid = |cfg_scale: f64| {
            NodeParams::XyPlot(XyPlotParams {
                base: file("/base"),
                base_config: None,
                loras: vec![],
                prompt: "a".into(),
                negative_prompt: String::new(),
                x: Axis::Lora(vec![None, Some(file("/lora"))]),
                y: Axis::Seed(vec![1, 2, 3]),
                steps: 12,
                cfg_scale,
                sampler: Sampler::Dpmpp2m,
                width: 64,
                height: 32,
                cell_scale: 1,
            })
        };
        // 2 x 3 cells, 12 steps, the guided halves as two evaluations each.
        assert_eq!(grid(7.0).work_estimate(), (6 * 12 * 2 * 64 * 32) as f64);
        assert_eq!(grid(1.0).work_estimate(), (6 * 12 * 64 * 32) as f64);
        let evaluate = NodeParams::Evaluate(EvaluateParams {
            base: file("/base"),
            base_config: None,
            lora: file("/lora"),
            meter: file("/meter"),
            weights: vec![-2.0, -1.0, 0.0, 1.0, 2.0],
            seeds: vec![1, 2, 3, 4],
            prompts: vec!["a".into(), "b".into(), "c".into()],
            negative_prompt: String::new(),
            steps: 12,
            cfg_scale: 7.0,
            sampler: Sampler::Dpmpp2m,
            width: 64,
            height: 64,
        });
        assert_eq!(evaluate.work_estimate(), (60 * 12 * 2 * 64 * 64) as f64);
        let merge = NodeParams::Merge(MergeParams {
            models: vec![file("/a"), file("/b")],
            ratios: vec![1.0, -1.0],
            save_precision: Precision::Float,
        });
        assert_eq!(merge.work_estimate(), 0.0);
    }
}

//! The `evaluate` node: how well a slider LoRA works, measured on the toy eye-size world.
//! For every prompt x seed x weight it samples with the LoRA at that weight, measures eye
//! size with the eye meter, and reports (1) the Spearman rank correlation of measured eye
//! size with the weight, per prompt and pooled, and (2) how much the image changes outside
//! the eyes compared with inside them, against the weight-0 image of the same prompt and seed.
//!
//! ```no_run
//! use std::path::{Path, PathBuf};
//! use slider_evaluate::{self as evaluate, EvaluateConfig};
//! use slider_protocol::params::Input;
//!
//! let params: slider_protocol::params::EvaluateParams = serde_json::from_str(r#"{
//!     "base": {"File": "/m/tiny-sd.safetensors"}, "lora": {"Node": "eyesize"},
//!     "meter": {"File": "/m/eye-meter.safetensors"},
//!     "weights": [-2, -1, 0, 1, 2], "seeds": [1, 2, 3], "prompts": ["1girl, side view"],
//!     "negative_prompt": "", "steps": 20, "cfg_scale": 7.0, "sampler": "euler_a",
//!     "width": 64, "height": 64}"#)?;
//! let config = EvaluateConfig::from_params(&params, |input| match input {
//!     Input::Node(_) => Some(PathBuf::from("/store/eyesize.safetensors")),
//!     Input::File(path) => Some(path.clone()),
//! })?;
//! let device = slider_models::open_device("cpu")?;
//! let report = evaluate::run(&config, Path::new("out"), &device, |p| eprintln!("{}", p.label))?;
//! println!("Spearman {:?}", report.pooled.spearman);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use image::RgbImage;
use serde::Serialize;
use serde_json::{Value, json};

pub mod eye_meter;
pub mod stats;

use crate::eye_meter::{EyeMeter, EyeMeterError};
use crate::stats::mean;
pub use crate::stats::{average_ranks, spearman};
use slider_grid::GridError;
use slider_models::diffusers_config::BaseConfig;
use slider_models::sample::{Generator, SampleError, SampleJob, SamplerKind};
use slider_protocol::params::{EvaluateParams, Input};

/// The `base_config` file read, or none.
fn base_config(path: Option<&std::path::Path>) -> Result<BaseConfig, SampleError> {
    path.map_or_else(
        || Ok(BaseConfig::none()),
        |p| BaseConfig::load(p).map_err(|e| SampleError::Checkpoint(e.into())),
    )
}

/// The primary output: every figure, as JSON.
pub const QUALITY_JSON: &str = "quality.json";
/// The same figures as a small markdown table.
pub const QUALITY_MD: &str = "quality.md";
/// The sampled images: weights across, (prompt, seed) down.
pub const GRID_FILE: &str = "grid.png";

/// What a meter reads off one image: the eye size and the eye boxes (`[x0, y0, x1, y1]`).
pub type Measurement = (f64, Vec<[f32; 4]>);
/// Why a meter could not read an image.
pub type MeasureError = Box<dyn std::error::Error + Send + Sync>;

/// An `evaluate` node's settings, with its inputs resolved to files.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateConfig {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The base model's diffusers config (`base_config`), when the recipe gives one.
    pub base_config: Option<PathBuf>,
    /// The slider LoRA under test.
    pub lora: PathBuf,
    /// What the reports call the LoRA: its node's name or the file's stem.
    pub lora_label: String,
    /// The eye meter's weights.
    pub meter: PathBuf,
    /// Slider weights; 0 (the base model) is among them.
    pub weights: Vec<f64>,
    /// One sample per seed at every weight.
    pub seeds: Vec<u64>,
    /// One evaluation per prompt.
    pub prompts: Vec<String>,
    /// The negative prompt.
    pub negative_prompt: String,
    /// Sampling steps.
    pub steps: usize,
    /// Guidance scale.
    pub cfg_scale: f64,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
}

/// Why an evaluation cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum EvaluateError {
    /// The node's parameters.
    #[error("`evaluate` node parameters: {0}")]
    Config(String),
    /// The LoRA file.
    #[error(transparent)]
    Lora(#[from] slider_lora::LoraError),
    /// Loading the base model.
    #[error(transparent)]
    Base(Box<SampleError>),
    /// Loading the eye meter.
    #[error("the eye meter: {0}")]
    Meter(Box<EyeMeterError>),
    /// Generating one sample.
    #[error("sample `{sample}`: {source}")]
    Sample {
        /// Prompt, seed and weight.
        sample: String,
        /// What went wrong.
        source: Box<SampleError>,
    },
    /// Measuring one sample.
    #[error("measuring sample `{sample}`: {source}")]
    Measure {
        /// Prompt, seed and weight.
        sample: String,
        /// What went wrong.
        source: MeasureError,
    },
    /// Composing or writing the grid, or writing a report.
    #[error(transparent)]
    Grid(#[from] GridError),
    /// Serialising the report.
    #[error("cannot serialise the quality report: {0}")]
    Json(#[from] serde_json::Error),
    /// Writing a report.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The report.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The output directory.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Progress after each finished sample.
#[derive(Debug, Clone, PartialEq)]
pub struct EvaluateProgress {
    /// Samples done.
    pub done: usize,
    /// Samples in all.
    pub total: usize,
    /// The finished sample, e.g. `1girl, side view / seed 3 / weight -0.5`.
    pub label: String,
}

/// One generated and measured image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleReading {
    /// Index into the config's prompts.
    pub prompt: usize,
    pub seed: u64,
    pub weight: f64,
    /// What the meter read.
    pub eye_size: f64,
    /// The meter's eye boxes, `[x0, y0, x1, y1]` in pixels.
    pub eye_boxes: Vec<[f32; 4]>,
    /// Change against the weight-0 image of the same prompt and seed (`None` at weight 0).
    pub change: Option<RegionChange>,
}

/// Mean absolute difference of two images (0-255 per channel), split by the eye mask.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RegionChange {
    /// Over the pixels outside the (dilated) eye boxes.
    pub outside: f64,
    /// Over the pixels inside them; `None` when the meter found no eyes in either image.
    pub inside: Option<f64>,
}

/// The figures of one prompt, or of all prompts pooled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualityFigures {
    /// Spearman rank correlation of measured eye size with weight over every sample
    /// (`None` when either is constant). Goal: >= 0.95.
    pub spearman: Option<f64>,
    /// Mean measured eye size at each weight (same order as `weights`).
    pub mean_eye_size: Vec<f64>,
    /// Mean outside-the-eyes change of the images at weights other than 0.
    pub outside_change: f64,
    /// Mean inside-the-eyes change of the same images (`None`: no eyes found anywhere).
    pub inside_change: Option<f64>,
    /// `outside_change / inside_change`: small means the slider changes the eyes, not the
    /// rest. `None` when there is no inside change to compare with.
    pub outside_inside_ratio: Option<f64>,
}

/// One prompt's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptQuality {
    pub prompt: String,
    #[serde(flatten)]
    pub figures: QualityFigures,
}

/// Everything `run` measured (`quality.json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualityReport {
    /// The LoRA's name.
    pub lora: String,
    pub weights: Vec<f64>,
    pub seeds: Vec<u64>,
    /// Pixels the eye boxes were grown by on every side before masking.
    pub box_margin: u32,
    pub prompts: Vec<PromptQuality>,
    pub pooled: QualityFigures,
    pub samples: Vec<SampleReading>,
}

impl EvaluateConfig {
    /// The settings of an `evaluate` node; `resolve` maps an input to the file holding its
    /// content. The recipe checks the lists at plan time; a request written by hand gets the
    /// same checks here.
    pub fn from_params(
        params: &EvaluateParams,
        resolve: impl Fn(&Input) -> Option<PathBuf>,
    ) -> Result<Self, EvaluateError> {
        let bad = EvaluateError::Config;
        let file = |k: &str, input: &Input| {
            resolve(input).ok_or_else(|| bad(format!("`{k}`: no file for input {input:?}")))
        };
        for (k, empty) in [
            ("weights", params.weights.is_empty()),
            ("seeds", params.seeds.is_empty()),
            ("prompts", params.prompts.is_empty()),
        ] {
            if empty {
                return Err(bad(format!("`{k}` is empty")));
            }
        }
        if !params.weights.iter().all(|w| w.is_finite()) {
            return Err(bad("`weights`: every value must be a finite number".into()));
        }
        if !params.weights.contains(&0.0) {
            return Err(bad(
                "`weights` must include 0, the reference for the change outside the eyes".into(),
            ));
        }
        Ok(Self {
            base: file("base", &params.base)?,
            base_config: params
                .base_config
                .as_ref()
                .map(|c| file("base_config", c))
                .transpose()?,
            lora: file("lora", &params.lora)?,
            lora_label: params.lora.label(),
            meter: file("meter", &params.meter)?,
            weights: params.weights.clone(),
            seeds: params.seeds.clone(),
            prompts: params.prompts.clone(),
            negative_prompt: params.negative_prompt.clone(),
            steps: params.steps,
            cfg_scale: params.cfg_scale,
            sampler: params.sampler.into(),
            width: params.width,
            height: params.height,
        })
    }

    /// The sampling settings of one image (the LoRA weight is applied separately).
    pub fn job(&self, prompt: usize, seed: u64) -> SampleJob {
        SampleJob {
            prompt: self.prompts[prompt].clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            sampler: self.sampler,
            width: self.width,
            height: self.height,
        }
    }

    /// Pixels the eye boxes grow by on each side: a thirty-second of the smaller side, at
    /// least 2 (2 px at 64x64, 16 px at 512x512).
    pub fn box_margin(&self) -> u32 {
        ((self.width.min(self.height) as u32) / 32).max(2)
    }

    /// The settings as JSON (the grid's `slider-run` text chunk).
    pub fn settings_json(&self) -> Value {
        json!({
            "kind": "evaluate",
            "lora": self.lora_label,
            "weights": self.weights,
            "seeds": self.seeds,
            "prompts": self.prompts,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "cfg_scale": self.cfg_scale,
            "sampler": self.sampler.recipe_name(),
            "width": self.width,
            "height": self.height,
        })
    }
}

/// Samples every prompt x seed x weight with `config.lora`, measures each image with the eye
/// meter, and writes `grid.png`, `quality.md` and `quality.json` into `output_dir`, each
/// atomically, the JSON (the node's primary output) last.
pub fn run(
    config: &EvaluateConfig,
    output_dir: &Path,
    device: &Device,
    progress: impl FnMut(EvaluateProgress),
) -> Result<QualityReport, EvaluateError> {
    let generator = base_config(config.base_config.as_deref())
        .and_then(|c| Generator::load_with(&config.base, &c, device))
        .map_err(|e| EvaluateError::Base(Box::new(e)))?;
    let lora = slider_lora::Lora::load(&config.lora)?;
    let meter =
        EyeMeter::load(&config.meter, device).map_err(|e| EvaluateError::Meter(Box::new(e)))?;
    evaluate_with(
        config,
        output_dir,
        |job, weight| {
            let loras = if weight == 0.0 {
                Vec::new()
            } else {
                vec![(&lora, weight)]
            };
            generator.generate(job, &loras)
        },
        |image| match meter.measure(image) {
            Ok(r) => Ok((f64::from(r.eye_size), r.eye_boxes)),
            Err(e) => Err(Box::new(e) as MeasureError),
        },
        progress,
    )
}

/// [`run`] with the sampler and the meter passed in: `generate(job, weight)` makes one
/// image, `measure(image)` reads `(eye size, eye boxes)` from it.
pub fn evaluate_with(
    config: &EvaluateConfig,
    output_dir: &Path,
    mut generate: impl FnMut(&SampleJob, f64) -> Result<RgbImage, SampleError>,
    mut measure: impl FnMut(&RgbImage) -> Result<Measurement, MeasureError>,
    mut progress: impl FnMut(EvaluateProgress),
) -> Result<QualityReport, EvaluateError> {
    let zero = config
        .weights
        .iter()
        .position(|w| *w == 0.0)
        .ok_or_else(|| EvaluateError::Config("`weights` must include 0".into()))?;
    let margin = config.box_margin();
    let total = config.prompts.len() * config.seeds.len() * config.weights.len();
    let mut samples = Vec::with_capacity(total);
    let mut rows = Vec::with_capacity(config.prompts.len() * config.seeds.len());
    for (p, prompt) in config.prompts.iter().enumerate() {
        for &seed in &config.seeds {
            let job = config.job(p, seed);
            let mut images = Vec::with_capacity(config.weights.len());
            let mut readings = Vec::with_capacity(config.weights.len());
            for &weight in &config.weights {
                let label = format!("{prompt} / seed {seed} / weight {weight}");
                let image = generate(&job, weight).map_err(|source| EvaluateError::Sample {
                    sample: label.clone(),
                    source: Box::new(source),
                })?;
                let reading = measure(&image).map_err(|source| EvaluateError::Measure {
                    sample: label.clone(),
                    source,
                })?;
                images.push(image);
                readings.push(reading);
                progress(EvaluateProgress {
                    done: samples.len() + readings.len(),
                    total,
                    label,
                });
            }
            let reference = &images[zero];
            let reference_boxes = readings[zero].1.clone();
            for (i, (&weight, (eye_size, eye_boxes))) in
                config.weights.iter().zip(readings).enumerate()
            {
                let change = (i != zero).then(|| {
                    let boxes: Vec<[f32; 4]> =
                        eye_boxes.iter().chain(&reference_boxes).copied().collect();
                    region_change(&images[i], reference, &boxes, margin)
                });
                samples.push(SampleReading {
                    prompt: p,
                    seed,
                    weight,
                    eye_size,
                    eye_boxes,
                    change,
                });
            }
            rows.push(images);
        }
    }

    let report = summarize(config, margin, samples);
    std::fs::create_dir_all(output_dir).map_err(|source| EvaluateError::Io {
        path: output_dir.to_path_buf(),
        source,
    })?;
    write_grid(config, &report, rows, &output_dir.join(GRID_FILE))?;
    write(&output_dir.join(QUALITY_MD), markdown(&report).as_bytes())?;
    let json = serde_json::to_vec_pretty(&report)?;
    write(&output_dir.join(QUALITY_JSON), &json)?;
    Ok(report)
}

/// The per-prompt and pooled figures of a set of readings.
pub fn summarize(
    config: &EvaluateConfig,
    box_margin: u32,
    samples: Vec<SampleReading>,
) -> QualityReport {
    let figures = |subset: &[&SampleReading]| -> QualityFigures {
        let weights: Vec<f64> = subset.iter().map(|s| s.weight).collect();
        let sizes: Vec<f64> = subset.iter().map(|s| s.eye_size).collect();
        let mean_eye_size = config
            .weights
            .iter()
            .map(|w| mean(subset.iter().filter(|s| s.weight == *w).map(|s| s.eye_size)))
            .collect();
        let changes: Vec<RegionChange> = subset.iter().filter_map(|s| s.change).collect();
        let outside_change = mean(changes.iter().map(|c| c.outside));
        let insides: Vec<f64> = changes.iter().filter_map(|c| c.inside).collect();
        let inside_change = (!insides.is_empty()).then(|| mean(insides.iter().copied()));
        let outside_inside_ratio = inside_change
            .filter(|i| *i > 0.0)
            .map(|i| outside_change / i);
        QualityFigures {
            spearman: spearman(&weights, &sizes),
            mean_eye_size,
            outside_change,
            inside_change,
            outside_inside_ratio,
        }
    };
    let prompts = config
        .prompts
        .iter()
        .enumerate()
        .map(|(p, prompt)| {
            let subset: Vec<&SampleReading> = samples.iter().filter(|s| s.prompt == p).collect();
            PromptQuality {
                prompt: prompt.clone(),
                figures: figures(&subset),
            }
        })
        .collect();
    let all: Vec<&SampleReading> = samples.iter().collect();
    QualityReport {
        lora: config.lora_label.clone(),
        weights: config.weights.clone(),
        seeds: config.seeds.clone(),
        box_margin,
        pooled: figures(&all),
        prompts,
        samples,
    }
}

/// Ranks from 1, ties sharing the average of the ranks they span (`[10, 20, 20]` ->
/// Mean absolute difference of `a` and `b` (same size) over the pixels outside the union
/// of `boxes` grown by `margin` pixels, and over those inside. A pixel is inside a box when
/// its centre is.
pub fn region_change(a: &RgbImage, b: &RgbImage, boxes: &[[f32; 4]], margin: u32) -> RegionChange {
    let m = margin as f32;
    let grown: Vec<[f32; 4]> = boxes
        .iter()
        .map(|[x0, y0, x1, y1]| [x0 - m, y0 - m, x1 + m, y1 + m])
        .collect();
    let (mut outside, mut n_out, mut inside, mut n_in) = (0u64, 0u64, 0u64, 0u64);
    for (x, y, pa) in a.enumerate_pixels() {
        let Some(pb) = b.get_pixel_checked(x, y) else {
            continue;
        };
        let diff: u64 =
            pa.0.iter()
                .zip(pb.0)
                .map(|(p, q)| u64::from(p.abs_diff(q)))
                .sum();
        let (cx, cy) = (x as f32 + 0.5, y as f32 + 0.5);
        let masked = grown
            .iter()
            .any(|[x0, y0, x1, y1]| cx >= *x0 && cx <= *x1 && cy >= *y0 && cy <= *y1);
        if masked {
            inside += diff;
            n_in += 3;
        } else {
            outside += diff;
            n_out += 3;
        }
    }
    let ratio = |sum: u64, n: u64| sum as f64 / n as f64;
    RegionChange {
        outside: if n_out == 0 {
            0.0
        } else {
            ratio(outside, n_out)
        },
        inside: (n_in > 0).then(|| ratio(inside, n_in)),
    }
}

/// Column labels (weights), row labels (prompt and seed) and title of the grid.
fn grid_labels(
    config: &EvaluateConfig,
    report: &QualityReport,
) -> (Vec<String>, Vec<String>, String) {
    let x_labels: Vec<String> = config
        .weights
        .iter()
        .map(|w| format!("weight {w}"))
        .collect();
    let y_labels: Vec<String> = config
        .prompts
        .iter()
        .flat_map(|p| {
            config.seeds.iter().map(move |s| {
                if config.prompts.len() == 1 {
                    format!("seed {s}")
                } else {
                    format!("{p} / seed {s}")
                }
            })
        })
        .collect();
    let title = format!(
        "{}: Spearman {}, outside/inside change {}",
        report.lora,
        fmt_opt(report.pooled.spearman, 3),
        fmt_opt(report.pooled.outside_inside_ratio, 3)
    );
    (x_labels, y_labels, title)
}

fn write_grid(
    config: &EvaluateConfig,
    report: &QualityReport,
    rows: Vec<Vec<RgbImage>>,
    path: &Path,
) -> Result<(), EvaluateError> {
    let (x_labels, y_labels, title) = grid_labels(config, report);
    let sheet = slider_grid::compose(&rows, &x_labels, &y_labels, Some(&title))?;
    let parameters = format!(
        "{}, Lora: {}, X/Y plot: weight x seed",
        config.job(0, config.seeds[0]).a1111_parameters(),
        config.lora_label
    );
    let text = [
        ("parameters".to_owned(), parameters),
        ("slider-run".to_owned(), config.settings_json().to_string()),
    ];
    slider_grid::write_png(path, &sheet, &text)?;
    Ok(())
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.decimals$}"))
}

/// Writes a report atomically.
fn write(path: &Path, bytes: &[u8]) -> Result<(), EvaluateError> {
    slider_atomic::write(path, bytes).map_err(|source| EvaluateError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// `quality.md`: one row per prompt and the pooled row, then eye size by weight.
pub fn markdown(report: &QualityReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Slider quality: `{}`\n", report.lora);
    let _ = writeln!(
        out,
        "{} seeds x {} weights per prompt; change = mean absolute pixel difference (0-255) to \
         the weight-0 image, outside vs inside the eye boxes grown by {} px.\n",
        report.seeds.len(),
        report.weights.len(),
        report.box_margin
    );
    let _ = writeln!(
        out,
        "| prompt | Spearman (eye size vs weight) | outside change | inside change | outside / inside |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- |");
    let rows = report
        .prompts
        .iter()
        .map(|p| (p.prompt.as_str(), &p.figures))
        .chain([("all prompts", &report.pooled)]);
    for (name, f) in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {} | {} |",
            name.replace('|', "\\|"),
            fmt_opt(f.spearman, 3),
            f.outside_change,
            fmt_opt(f.inside_change, 2),
            fmt_opt(f.outside_inside_ratio, 3)
        );
    }
    let _ = writeln!(out, "\nMean measured eye size by weight:\n");
    let header: Vec<String> = report.weights.iter().map(|w| format!("{w}")).collect();
    let _ = writeln!(out, "| prompt | {} |", header.join(" | "));
    let _ = writeln!(out, "| --- |{}", " --- |".repeat(header.len()));
    let rows = report
        .prompts
        .iter()
        .map(|p| (p.prompt.as_str(), &p.figures))
        .chain([("all prompts", &report.pooled)]);
    for (name, f) in rows {
        let sizes: Vec<String> = f.mean_eye_size.iter().map(|s| format!("{s:.3}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} |",
            name.replace('|', "\\|"),
            sizes.join(" | ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    fn json() -> Value {
        json!({
            "kind": "evaluate", "base": {"File": "/m/base.safetensors"},
            "lora": {"Node": "eyesize"}, "meter": {"File": "/m/eye-meter.safetensors"},
            "weights": [-2, -1, -0.5, 0, 0.5, 1, 2], "seeds": [1, 2, 3],
            "prompts": ["1girl, front view", "1girl, side view"], "negative_prompt": "lowres",
            "steps": 12, "cfg_scale": 6.5, "sampler": "dpmpp_2m", "width": 64, "height": 48
        })
    }

    fn params() -> EvaluateParams {
        serde_json::from_value(json()).unwrap()
    }

    fn resolve(input: &Input) -> Option<PathBuf> {
        match input {
            Input::File(f) if f.as_os_str().is_empty() => None,
            Input::File(f) => Some(f.clone()),
            Input::Node(n) => Some(PathBuf::from(format!("/store/{n}/lora.safetensors"))),
        }
    }

    #[test]
    fn average_ranks_share_ties() {
        let cases: [(&[f64], &[f64]); 5] = [
            (&[3.0, 1.0, 2.0], &[3.0, 1.0, 2.0]),
            (&[10.0, 20.0, 20.0], &[1.0, 2.5, 2.5]),
            (&[5.0, 5.0, 5.0, 5.0], &[2.5, 2.5, 2.5, 2.5]),
            (&[-0.5, 2.0, -0.5, 0.0, 2.0], &[1.5, 4.5, 1.5, 3.0, 4.5]),
            (&[], &[]),
        ];
        for (values, expected) in cases {
            assert_eq!(average_ranks(values), expected, "{values:?}");
        }
    }

    #[test]
    fn spearman_matches_reference_values() {
        // Expected: Pearson correlation of average ranks (scipy.stats.spearmanr's definition),
        // computed with numpy; the first checked by hand: ranks of y are [1, 2, 3.5, 5, 3.5],
        // cov = 8, var x = 10, var y = 9.5, 8 / sqrt(95) = 0.82078.
        let cases: [(&[f64], &[f64], f64); 5] = [
            (
                &[1.0, 2.0, 3.0, 4.0, 5.0],
                &[5.0, 6.0, 7.0, 8.0, 7.0],
                0.8207826816681234,
            ),
            (
                &[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0],
                &[0.1, 0.2, 0.2, 0.4, 0.3, 0.9, 1.0],
                0.9549937104572924,
            ),
            (
                &[-2.0, -2.0, 0.0, 0.0, 2.0, 2.0],
                &[1.0, 1.5, 2.0, 2.0, 3.0, 2.5],
                0.970142500145332,
            ),
            (&[1.0, 2.0, 3.0, 4.0], &[4.0, 3.0, 2.0, 1.0], -1.0),
            (
                &[0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0],
                &[10.0, 12.0, 11.0, 13.0, 15.0, 14.0, 20.0, 19.0],
                0.9271050693011065,
            ),
        ];
        for (x, y, expected) in cases {
            let r = spearman(x, y).unwrap();
            assert!(
                (r - expected).abs() < 1e-12,
                "{x:?} {y:?}: {r} != {expected}"
            );
            // Symmetric, and invariant under monotone transforms of either side.
            let r_swapped = spearman(y, x).unwrap();
            assert!((r_swapped - expected).abs() < 1e-12);
            let cubed: Vec<f64> = y.iter().map(|v| v * v * v + 7.0).collect();
            assert!((spearman(x, &cubed).unwrap() - expected).abs() < 1e-12);
        }
    }

    #[test]
    fn spearman_is_undefined_without_variation() {
        let cases: [(&[f64], &[f64]); 4] = [
            (&[1.0, 2.0, 3.0], &[4.0, 4.0, 4.0]),
            (&[0.0, 0.0], &[1.0, 2.0]),
            (&[1.0], &[2.0]),
            (&[1.0, 2.0], &[1.0, 2.0, 3.0]),
        ];
        for (x, y) in cases {
            assert_eq!(spearman(x, y), None, "{x:?} {y:?}");
        }
    }

    /// 20x10 image, value `base` everywhere and `eye` in x 4..8, y 2..6.
    fn two_level(base: u8, eye: u8) -> RgbImage {
        RgbImage::from_fn(20, 10, |x, y| {
            let v = if (4..8).contains(&x) && (2..6).contains(&y) {
                eye
            } else {
                base
            };
            Rgb([v, v, v])
        })
    }

    /// (case, first, second, boxes, margin, outside, inside)
    type ChangeCase<'a> = (
        &'a str,
        &'a RgbImage,
        &'a RgbImage,
        Vec<[f32; 4]>,
        u32,
        f64,
        Option<f64>,
    );

    #[test]
    fn region_change_splits_the_difference_at_the_grown_boxes() {
        let a = two_level(100, 100);
        let b = two_level(100, 160);
        let c = two_level(90, 160); // also 10 darker outside the eye
        let eye = [4.0, 2.0, 8.0, 6.0];
        let cases: [ChangeCase; 6] = [
            ("identical", &a, &a, vec![eye], 0, 0.0, Some(0.0)),
            ("eyes only", &a, &b, vec![eye], 0, 0.0, Some(60.0)),
            // A margin of 1 px adds a ring of 6x6 - 4x4 = 20 unchanged pixels to the inside.
            (
                "grown box",
                &a,
                &b,
                vec![eye],
                1,
                0.0,
                Some(60.0 * 16.0 / 36.0),
            ),
            ("everything", &a, &c, vec![eye], 0, 10.0, Some(60.0)),
            ("no boxes", &a, &b, vec![], 3, 60.0 * 16.0 / 200.0, None),
            // Two overlapping boxes count their pixels once.
            (
                "union",
                &a,
                &b,
                vec![eye, [5.0, 3.0, 7.0, 5.0]],
                0,
                0.0,
                Some(60.0),
            ),
        ];
        for (name, x, y, boxes, margin, outside, inside) in cases {
            let change = region_change(x, y, &boxes, margin);
            assert!(
                (change.outside - outside).abs() < 1e-9,
                "{name}: {change:?}"
            );
            match (change.inside, inside) {
                (Some(got), Some(want)) => assert!((got - want).abs() < 1e-9, "{name}: {got}"),
                (got, want) => assert_eq!(got, want, "{name}"),
            }
        }
    }

    #[test]
    fn reads_the_recipe_parameters() {
        let c = EvaluateConfig::from_params(&params(), resolve).unwrap();
        assert_eq!(c.base, PathBuf::from("/m/base.safetensors"));
        assert_eq!(c.lora, PathBuf::from("/store/eyesize/lora.safetensors"));
        assert_eq!(c.lora_label, "eyesize");
        assert_eq!(c.meter, PathBuf::from("/m/eye-meter.safetensors"));
        assert_eq!(c.weights, [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]);
        assert_eq!(c.seeds, [1, 2, 3]);
        assert_eq!(c.prompts, ["1girl, front view", "1girl, side view"]);
        assert_eq!(c.negative_prompt, "lowres");
        assert_eq!((c.steps, c.cfg_scale, c.width, c.height), (12, 6.5, 64, 48));
        assert_eq!(c.sampler, SamplerKind::DpmPp2mKarras);
        assert_eq!(c.box_margin(), 2);
        let job = c.job(1, 3);
        assert_eq!(
            (job.prompt.as_str(), job.seed, job.steps),
            ("1girl, side view", 3, 12)
        );
        let mut file_lora = params();
        file_lora.lora = Input::File("/l/my-slider.safetensors".into());
        let c = EvaluateConfig::from_params(&file_lora, resolve).unwrap();
        assert_eq!(c.lora_label, "my-slider");
    }

    #[test]
    fn refuses_parameters_it_cannot_evaluate() {
        // What the types cannot hold never decodes (the worker answers "malformed request").
        type JsonEdit = fn(&mut Value);
        let malformed: [(&str, JsonEdit); 4] = [
            ("text weight", |p| p["weights"] = json!([0, "x"])),
            ("negative seed", |p| p["seeds"] = json!([1, -1])),
            ("unknown sampler", |p| p["sampler"] = json!("heun")),
            ("negative steps", |p| p["steps"] = json!(-3)),
        ];
        for (name, edit) in malformed {
            let mut p = json();
            edit(&mut p);
            assert!(
                serde_json::from_value::<EvaluateParams>(p).is_err(),
                "{name}"
            );
        }
        type Edit = fn(&mut EvaluateParams);
        let cases: [(&str, Edit, &str); 6] = [
            (
                "no base",
                |p| p.base = Input::File("".into()),
                "`base`: no file",
            ),
            (
                "no meter",
                |p| p.meter = Input::File("".into()),
                "`meter`: no file",
            ),
            ("no zero", |p| p.weights = vec![-1.0, 1.0], "must include 0"),
            ("empty weights", |p| p.weights.clear(), "`weights` is empty"),
            (
                "infinite weight",
                |p| p.weights = vec![0.0, f64::NAN],
                "finite number",
            ),
            ("no prompts", |p| p.prompts.clear(), "`prompts` is empty"),
        ];
        for (name, edit, message) in cases {
            let mut p = params();
            edit(&mut p);
            let err = EvaluateConfig::from_params(&p, resolve)
                .unwrap_err()
                .to_string();
            assert!(err.contains(message), "{name}: {err}");
        }
    }

    /// A toy sampler: a grey background that depends on the seed, a dark square "eye" whose
    /// half-width grows with the weight, and, if `drift` is set, a brightness shift of the
    /// whole image with |weight| (a slider that leaks outside the eyes).
    fn toy_generate(job: &SampleJob, weight: f64, drift: f64) -> Result<RgbImage, SampleError> {
        let (w, h) = (job.width as u32, job.height as u32);
        let background = 120 + (job.seed % 5) as u8 * 10;
        let shift = (drift * weight.abs()).round() as u8;
        let half = (6.0 + 2.0 * weight).round() as i64;
        let (cx, cy) = (i64::from(w) / 2, i64::from(h) / 2);
        Ok(RgbImage::from_fn(w, h, |x, y| {
            let in_eye = (i64::from(x) - cx).abs() < half && (i64::from(y) - cy).abs() < half;
            let v = if in_eye { 20 } else { background + shift };
            Rgb([v, v, v])
        }))
    }

    /// A toy meter: the eye is every pixel darker than 64; size = sqrt(count); box = extent.
    fn toy_measure(image: &RgbImage) -> Result<Measurement, MeasureError> {
        let dark: Vec<(u32, u32)> = image
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0[0] < 64)
            .map(|(x, y, _)| (x, y))
            .collect();
        let Some(&(x, y)) = dark.first() else {
            return Ok((0.0, vec![]));
        };
        let mut b = [x as f32, y as f32, x as f32 + 1.0, y as f32 + 1.0];
        for &(x, y) in &dark {
            b = [
                b[0].min(x as f32),
                b[1].min(y as f32),
                b[2].max(x as f32 + 1.0),
                b[3].max(y as f32 + 1.0),
            ];
        }
        Ok(((dark.len() as f64).sqrt(), vec![b]))
    }

    fn toy_config() -> EvaluateConfig {
        let mut p = params();
        p.weights = vec![-2.0, -1.0, 0.0, 1.0, 2.0];
        p.seeds = vec![1, 2];
        p.width = 48;
        p.height = 40;
        EvaluateConfig::from_params(&p, resolve).unwrap()
    }

    #[test]
    fn a_clean_slider_scores_one_and_changes_nothing_outside_the_eyes() {
        let dir = tempfile::tempdir().unwrap();
        let config = toy_config();
        let mut seen = Vec::new();
        let report = evaluate_with(
            &config,
            dir.path(),
            |job, w| toy_generate(job, w, 0.0),
            toy_measure,
            |p| seen.push((p.done, p.total)),
        )
        .unwrap();
        assert_eq!(seen.len(), 2 * 2 * 5);
        assert_eq!(seen.last(), Some(&(20, 20)));
        assert_eq!(report.samples.len(), 20);
        for figures in report
            .prompts
            .iter()
            .map(|p| &p.figures)
            .chain([&report.pooled])
        {
            assert_eq!(figures.spearman, Some(1.0));
            assert_eq!(figures.outside_change, 0.0);
            assert!(figures.inside_change.unwrap() > 10.0);
            assert_eq!(figures.outside_inside_ratio, Some(0.0));
            // Eye half-widths 2, 4, 6, 8, 10 -> square sides 3, 7, 11, 15, 19.
            assert_eq!(figures.mean_eye_size, [3.0, 7.0, 11.0, 15.0, 19.0]);
        }
        let zero: Vec<_> = report.samples.iter().filter(|s| s.weight == 0.0).collect();
        assert!(zero.iter().all(|s| s.change.is_none()));

        // The three files, and the JSON is the report.
        let json: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(QUALITY_JSON)).unwrap()).unwrap();
        assert_eq!(json["lora"], "eyesize");
        assert_eq!(json["pooled"]["spearman"], 1.0);
        assert_eq!(json["prompts"][1]["prompt"], "1girl, side view");
        assert_eq!(json["samples"].as_array().unwrap().len(), 20);
        // Its readers (the run's summary line, the HTML report) read the same figures.
        let read = slider_protocol::quality::QualityFile::parse(
            &std::fs::read(dir.path().join(QUALITY_JSON)).unwrap(),
        )
        .unwrap();
        assert_eq!(read.lora, "eyesize");
        assert_eq!(read.prompts.len(), 2);
        assert_eq!(
            (read.pooled.spearman, read.pooled.outside_change),
            (Some(1.0), Some(0.0))
        );
        assert_eq!(read.pooled.goal(), "met");
        let md = std::fs::read_to_string(dir.path().join(QUALITY_MD)).unwrap();
        assert!(md.contains("| 1girl, side view | 1.000 | 0.00 |"), "{md}");
        assert!(md.contains("| all prompts | 1.000 |"), "{md}");
        let png = dir.path().join(GRID_FILE);
        let sheet = image::open(&png).unwrap().to_rgb8();
        let (x, y, title) = grid_labels(&config, &report);
        assert_eq!(x[0], "weight -2");
        assert_eq!(y[3], "1girl, side view / seed 2");
        assert_eq!(
            title,
            "eyesize: Spearman 1.000, outside/inside change 0.000"
        );
        let cells: Vec<Vec<RgbImage>> = vec![vec![RgbImage::new(48, 40); 5]; 4];
        let layout = slider_grid::layout(&cells, &x, &y, Some(&title)).unwrap();
        assert_eq!(sheet.dimensions(), (layout.width, layout.height));
        // The cell of seed 2, weight 2 (front view) is the toy image, unchanged.
        let (ox, oy) = layout.cell_origin(1, 4);
        let expected = toy_generate(&config.job(0, 2), 2.0, 0.0).unwrap();
        let cell = image::imageops::crop_imm(&sheet, ox, oy, 48, 40).to_image();
        assert_eq!(cell, expected);
        let text = slider_grid::read_png_text(&png).unwrap();
        let settings = text.iter().find(|(k, _)| k == "slider-run").unwrap();
        assert!(
            settings.1.contains("\"kind\":\"evaluate\""),
            "{}",
            settings.1
        );
        assert!(
            text.iter()
                .any(|(k, v)| k == "parameters" && v.contains("Lora: eyesize"))
        );
    }

    #[test]
    fn a_leaky_slider_shows_its_outside_change() {
        let dir = tempfile::tempdir().unwrap();
        let config = toy_config();
        let report = evaluate_with(
            &config,
            dir.path(),
            |job, w| toy_generate(job, w, 15.0),
            toy_measure,
            |_| {},
        )
        .unwrap();
        // The eye still grows with the weight...
        assert_eq!(report.pooled.spearman, Some(1.0));
        // ...but the background moved by 15 x |w|: mean over w in {-2, -1, 1, 2} = 22.5.
        assert!(
            (report.pooled.outside_change - 22.5).abs() < 1e-9,
            "{report:?}"
        );
        assert!(report.pooled.outside_inside_ratio.unwrap() > 0.1);
    }

    #[test]
    fn a_reversed_slider_correlates_negatively() {
        let dir = tempfile::tempdir().unwrap();
        let config = toy_config();
        let report = evaluate_with(
            &config,
            dir.path(),
            |job, w| toy_generate(job, -w, 0.0),
            toy_measure,
            |_| {},
        )
        .unwrap();
        assert_eq!(report.pooled.spearman, Some(-1.0));
    }

    #[test]
    fn failures_name_the_sample_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let config = toy_config();
        let err = evaluate_with(
            &config,
            dir.path(),
            |job, w| toy_generate(job, w, 0.0),
            |image| {
                if image.get_pixel(0, 0).0[0] == 140 {
                    Err("the meter saw a seed-2 background".into())
                } else {
                    toy_measure(image)
                }
            },
            |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("1girl, front view / seed 2 / weight -2"),
            "{err}"
        );
        assert!(err.contains("seed-2 background"), "{err}");
        assert!(!dir.path().join(QUALITY_JSON).exists());
    }

    /// `run` end to end on a random small base, a random LoRA and a meter trained for one
    /// step: only the plumbing (files, counts, weight 0 = the base model) can be checked.
    #[test]
    fn run_samples_measures_and_writes_the_report() {
        use crate::eye_meter::{EyeMeterTrainConfig, train_eye_meter};
        use slider_models::sample::test_support::{random_lora, small_generator};
        let dir = tempfile::tempdir().unwrap();
        let device = Device::flex();
        let g = small_generator(dir.path());
        let lora_path = dir.path().join("slider.safetensors");
        random_lora(&g, 3)
            .save(&lora_path, slider_lora::Precision::F32)
            .unwrap();
        let meter_config = EyeMeterTrainConfig {
            steps: 1,
            batch: 2,
            warmup: 1,
            ..EyeMeterTrainConfig::default()
        };
        let (meter, _) = train_eye_meter(&meter_config, &device, &mut |_| {}).unwrap();
        let meter_path = dir.path().join("meter.safetensors");
        meter.save(&meter_path, &[]).unwrap();
        let config = EvaluateConfig {
            base: dir.path().join("base.safetensors"),
            base_config: None,
            lora: lora_path,
            lora_label: "slider".into(),
            meter: meter_path,
            weights: vec![-1.0, 0.0, 1.0],
            seeds: vec![4],
            prompts: vec!["a face".into()],
            negative_prompt: String::new(),
            steps: 2,
            cfg_scale: 4.0,
            sampler: SamplerKind::Euler,
            width: 32,
            height: 32,
        };
        let out = dir.path().join("out");
        let mut seen = 0;
        let report = run(&config, &out, &device, |_| seen += 1).unwrap();
        assert_eq!((seen, report.samples.len()), (3, 3));
        for file in [QUALITY_JSON, QUALITY_MD, GRID_FILE] {
            assert!(out.join(file).is_file(), "{file}");
        }
        // Weight 0 is the base model: the same image as a plain generation.
        let plain = g.generate(&config.job(0, 4), &[]).unwrap();
        let sheet = image::open(out.join(GRID_FILE)).unwrap().to_rgb8();
        let (x, y, title) = grid_labels(&config, &report);
        let cells = vec![vec![RgbImage::new(32, 32); 3]];
        let layout = slider_grid::layout(&cells, &x, &y, Some(&title)).unwrap();
        let (ox, oy) = layout.cell_origin(0, 1);
        let cell = image::imageops::crop_imm(&sheet, ox, oy, 32, 32).to_image();
        assert_eq!(cell, plain);
        let json: Value =
            serde_json::from_slice(&std::fs::read(out.join(QUALITY_JSON)).unwrap()).unwrap();
        assert_eq!(json["samples"].as_array().map(Vec::len), Some(3));
        assert!(json["pooled"]["outside_change"].as_f64().is_some());
    }
}

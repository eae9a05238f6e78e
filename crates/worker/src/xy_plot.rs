//! The `xy_plot` node: one check grid of generated images, the x axis across columns and the
//! y axis down rows, each axis varying one setting (the first LoRA's weight, the seed, the
//! prompt, or which LoRA is applied), written as `grid.png` with the settings in PNG text.
//!
//! Every cell starts from the node's settings: seed 0, the node's prompt, every LoRA of
//! `loras` at weight 1. The x value, then the y value, changes one of them: a `weight` sets
//! the first LoRA's weight, a `lora` adds that LoRA at weight 1 (`null`: adds none).
//!
//! ```no_run
//! use std::path::{Path, PathBuf};
//! use slider_protocol::params::Input;
//! use slider_worker::xy_plot::{self, XyPlotConfig};
//!
//! let params: slider_protocol::params::XyPlotParams = serde_json::from_str(r#"{
//!     "base": {"File": "/m/tiny.safetensors"}, "loras": [{"Node": "eyesize"}],
//!     "prompt": "1girl", "negative_prompt": "", "steps": 20, "cfg_scale": 7.0,
//!     "sampler": "euler_a", "width": 64, "height": 64,
//!     "x": {"axis": "weight", "values": [-2, 0, 2]}, "y": {"axis": "seed", "values": [1, 2]}}"#)?;
//! let config = XyPlotConfig::from_params(&params, |input| match input {
//!     Input::Node(_) => Some(PathBuf::from("/store/eyesize.safetensors")),
//!     Input::File(path) => Some(path.clone()),
//! })?;
//! let device = slider_models::open_device("cpu")?;
//! let outcome = xy_plot::run(&config, Path::new("out"), &device, |p| eprintln!("{}", p.label))?;
//! assert_eq!(outcome.cells, 6);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::{Value, json};

use slider_grid::GridError;
use slider_models::diffusers_config::BaseConfig;
use slider_models::sample::{Generator, SampleError, SampleJob, SamplerKind};
use slider_protocol::params::{Axis, Input, XyPlotParams};

/// The `base_config` file read, or none.
fn base_config(path: Option<&std::path::Path>) -> Result<BaseConfig, SampleError> {
    path.map_or_else(
        || Ok(BaseConfig::none()),
        |p| BaseConfig::load(p).map_err(|e| SampleError::Checkpoint(e.into())),
    )
}

/// The file `run` writes into its output directory.
pub const GRID_FILE: &str = "grid.png";

/// A LoRA the node reads: where its content is and what the grid calls it.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInput {
    /// The node that made it, or the file's stem.
    pub label: String,
    /// The file holding it.
    pub path: PathBuf,
}

/// What one axis varies, and its values.
#[derive(Debug, Clone, PartialEq)]
pub enum AxisValues {
    /// The weight of the first of `loras`.
    Weight(Vec<f64>),
    /// The seed.
    Seed(Vec<u64>),
    /// The prompt.
    Prompt(Vec<String>),
    /// One more LoRA at weight 1 (`None`: no other LoRA).
    Lora(Vec<Option<LoraInput>>),
}

impl AxisValues {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            AxisValues::Weight(v) => v.len(),
            AxisValues::Seed(v) => v.len(),
            AxisValues::Prompt(v) => v.len(),
            AxisValues::Lora(v) => v.len(),
        }
    }

    /// Whether the axis has no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The recipe name of the axis.
    pub fn name(&self) -> &'static str {
        match self {
            AxisValues::Weight(_) => "weight",
            AxisValues::Seed(_) => "seed",
            AxisValues::Prompt(_) => "prompt",
            AxisValues::Lora(_) => "lora",
        }
    }

    /// The label of value `i` on the sheet: `weight -2`, `seed 3`, the prompt, the LoRA's
    /// name or `none`.
    pub fn label(&self, i: usize) -> String {
        match self {
            AxisValues::Weight(v) => format!("weight {}", v[i]),
            AxisValues::Seed(v) => format!("seed {}", v[i]),
            AxisValues::Prompt(v) => v[i].clone(),
            AxisValues::Lora(v) => v[i]
                .as_ref()
                .map_or_else(|| "none".to_owned(), |l| l.label.clone()),
        }
    }

    fn values_json(&self) -> Value {
        match self {
            AxisValues::Weight(v) => json!(v),
            AxisValues::Seed(v) => json!(v),
            AxisValues::Prompt(v) => json!(v),
            AxisValues::Lora(v) => json!(
                v.iter()
                    .map(|l| l.as_ref().map(|l| l.label.clone()))
                    .collect::<Vec<_>>()
            ),
        }
    }
}

/// An `xy_plot` node's settings, with its inputs resolved to files.
#[derive(Debug, Clone, PartialEq)]
pub struct XyPlotConfig {
    /// The base checkpoint.
    pub base: PathBuf,
    /// The base model's diffusers config (`base_config`), when the recipe gives one.
    pub base_config: Option<PathBuf>,
    /// LoRAs applied to every cell at weight 1 (the first one's weight is what a `weight`
    /// axis varies).
    pub loras: Vec<LoraInput>,
    /// The prompt of every cell unless a `prompt` axis varies it.
    pub prompt: String,
    /// The negative prompt.
    pub negative_prompt: String,
    /// Across the columns.
    pub x: AxisValues,
    /// Down the rows.
    pub y: AxisValues,
    /// Sampling steps.
    pub steps: usize,
    /// Guidance scale.
    pub cfg_scale: f64,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Cell width in pixels.
    pub width: usize,
    /// Cell height in pixels.
    pub height: usize,
    /// Each cell drawn this many times larger on the sheet (nearest neighbour).
    pub cell_scale: u32,
}

/// The largest `cell_scale` a node may ask for.
pub const MAX_CELL_SCALE: u32 = 16;

/// Why a grid cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum XyPlotError {
    /// The node's parameters.
    #[error("`xy_plot` node parameters: {0}")]
    Config(String),
    /// A LoRA file.
    #[error(transparent)]
    Lora(#[from] slider_lora::LoraError),
    /// Generating a cell.
    #[error("cell `{cell}`: {source}")]
    Sample {
        /// The cell's labels.
        cell: String,
        /// What went wrong.
        source: Box<SampleError>,
    },
    /// Loading the base model.
    #[error(transparent)]
    Base(Box<SampleError>),
    /// Composing or writing the sheet.
    #[error(transparent)]
    Grid(#[from] GridError),
    /// The output directory.
    #[error("cannot create {path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Progress after each finished cell.
#[derive(Debug, Clone, PartialEq)]
pub struct XyProgress {
    /// Cells done.
    pub cell: usize,
    /// Cells in all.
    pub cells: usize,
    /// The finished cell's labels, `x label / y label`.
    pub label: String,
}

/// What `run` made.
#[derive(Debug, Clone, PartialEq)]
pub struct XyPlotOutcome {
    /// The sheet (`output_dir/grid.png`).
    pub grid: PathBuf,
    /// Number of generated images.
    pub cells: usize,
}

impl XyPlotConfig {
    /// The settings of an `xy_plot` node; `resolve` maps an input to the file holding its
    /// content. The recipe checks the axes at plan time; a request written by hand gets the
    /// same checks here.
    pub fn from_params(
        params: &XyPlotParams,
        resolve: impl Fn(&Input) -> Option<PathBuf>,
    ) -> Result<Self, XyPlotError> {
        let bad = XyPlotError::Config;
        let file = |input: &Input| {
            resolve(input).ok_or_else(|| bad(format!("no file for input {input:?}")))
        };
        let lora = |input: &Input| -> Result<LoraInput, XyPlotError> {
            Ok(LoraInput {
                label: input.label(),
                path: file(input)?,
            })
        };
        let loras = params
            .loras
            .iter()
            .map(lora)
            .collect::<Result<Vec<_>, _>>()?;
        let axis = |k: &str, axis: &Axis| -> Result<AxisValues, XyPlotError> {
            let values = match axis {
                Axis::Weight(v) => {
                    if !v.iter().all(|w| w.is_finite()) {
                        return Err(bad(format!(
                            "`{k}` axis: every value must be a finite number"
                        )));
                    }
                    AxisValues::Weight(v.clone())
                }
                Axis::Seed(v) => AxisValues::Seed(v.clone()),
                Axis::Prompt(v) => AxisValues::Prompt(v.clone()),
                Axis::Lora(v) => AxisValues::Lora(
                    v.iter()
                        .map(|l| l.as_ref().map(lora).transpose())
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if values.is_empty() {
                return Err(bad(format!("the `{k}` axis has no values")));
            }
            Ok(values)
        };
        let (x, y) = (axis("x", &params.x)?, axis("y", &params.y)?);
        for a in [&x, &y] {
            if matches!(a, AxisValues::Weight(_)) && loras.is_empty() {
                return Err(bad(
                    "a `weight` axis needs a LoRA in `loras` to weigh".into()
                ));
            }
        }
        if x.name() == y.name() {
            return Err(bad(format!("`x` and `y` both vary `{}`", x.name())));
        }
        if !(1..=MAX_CELL_SCALE).contains(&params.cell_scale) {
            return Err(bad(format!(
                "`cell_scale` must be between 1 and {MAX_CELL_SCALE}, found {}",
                params.cell_scale
            )));
        }
        Ok(Self {
            base: file(&params.base)?,
            base_config: params.base_config.as_ref().map(file).transpose()?,
            loras,
            prompt: params.prompt.clone(),
            negative_prompt: params.negative_prompt.clone(),
            x,
            y,
            steps: params.steps,
            cfg_scale: params.cfg_scale,
            sampler: params.sampler.into(),
            width: params.width,
            height: params.height,
            cell_scale: params.cell_scale,
        })
    }

    /// The settings of the cell in row `row`, column `column`, and its LoRAs with weights.
    pub fn cell(&self, row: usize, column: usize) -> (SampleJob, Vec<(LoraInput, f64)>) {
        let mut job = SampleJob {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            seed: 0,
            steps: self.steps,
            cfg_scale: self.cfg_scale,
            sampler: self.sampler,
            width: self.width,
            height: self.height,
        };
        let mut loras: Vec<(LoraInput, f64)> =
            self.loras.iter().map(|l| (l.clone(), 1.0)).collect();
        for (axis, i) in [(&self.x, column), (&self.y, row)] {
            match axis {
                AxisValues::Weight(v) => {
                    if let Some(first) = loras.first_mut() {
                        first.1 = v[i];
                    }
                }
                AxisValues::Seed(v) => job.seed = v[i],
                AxisValues::Prompt(v) => job.prompt = v[i].clone(),
                AxisValues::Lora(v) => {
                    if let Some(l) = &v[i] {
                        loras.push((l.clone(), 1.0));
                    }
                }
            }
        }
        (job, loras)
    }

    /// The settings as JSON (the sheet's `slider-run` text chunk), with every cell's seed,
    /// prompt and LoRA weights (`cells`: rows of columns).
    pub fn settings_json(&self) -> Value {
        let cells: Vec<Vec<Value>> = (0..self.y.len())
            .map(|row| {
                (0..self.x.len())
                    .map(|column| {
                        let (job, loras) = self.cell(row, column);
                        let loras: Vec<Value> =
                            loras.iter().map(|(l, w)| json!([l.label, w])).collect();
                        json!({"seed": job.seed, "prompt": job.prompt, "loras": loras})
                    })
                    .collect()
            })
            .collect();
        json!({
            "kind": "xy_plot",
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "loras": self.loras.iter().map(|l| l.label.clone()).collect::<Vec<_>>(),
            "x": {"axis": self.x.name(), "values": self.x.values_json()},
            "y": {"axis": self.y.name(), "values": self.y.values_json()},
            "steps": self.steps,
            "cfg_scale": self.cfg_scale,
            "sampler": self.sampler.recipe_name(),
            "width": self.width,
            "height": self.height,
            "cells": cells,
        })
    }
}

/// Generates every cell, composes the sheet with its labels and writes `output_dir/grid.png`
/// (atomically) with the settings as PNG text: `parameters` (AUTOMATIC1111's format, the
/// first cell's settings plus the axes) and `slider-run` (JSON).
pub fn run(
    config: &XyPlotConfig,
    output_dir: &Path,
    device: &Device,
    mut progress: impl FnMut(XyProgress),
) -> Result<XyPlotOutcome, XyPlotError> {
    let generator = base_config(config.base_config.as_deref())
        .and_then(|c| Generator::load_with(&config.base, &c, device))
        .map_err(|e| XyPlotError::Base(Box::new(e)))?;
    let mut files: BTreeMap<PathBuf, slider_lora::Lora> = BTreeMap::new();
    let on_axes = [&config.x, &config.y].into_iter().flat_map(|a| match a {
        AxisValues::Lora(v) => v.iter().flatten().collect(),
        _ => Vec::new(),
    });
    for l in config.loras.iter().chain(on_axes) {
        if !files.contains_key(&l.path) {
            files.insert(l.path.clone(), slider_lora::Lora::load(&l.path)?);
        }
    }

    let (rows, columns) = (config.y.len(), config.x.len());
    let cells_total = rows * columns;
    let mut sheet_cells = Vec::with_capacity(rows);
    for row in 0..rows {
        let mut images = Vec::with_capacity(columns);
        for column in 0..columns {
            let (job, loras) = config.cell(row, column);
            let weighted: Vec<(&slider_lora::Lora, f64)> = loras
                .iter()
                .filter_map(|(l, w)| files.get(&l.path).map(|f| (f, *w)))
                .collect();
            let label = format!("{} / {}", config.x.label(column), config.y.label(row));
            let image =
                generator
                    .generate(&job, &weighted)
                    .map_err(|source| XyPlotError::Sample {
                        cell: label.clone(),
                        source: Box::new(source),
                    })?;
            images.push(slider_grid::scale_up(&image, config.cell_scale)?);
            progress(XyProgress {
                cell: row * columns + column + 1,
                cells: cells_total,
                label,
            });
        }
        sheet_cells.push(images);
    }

    let x_labels: Vec<String> = (0..columns).map(|i| config.x.label(i)).collect();
    let y_labels: Vec<String> = (0..rows).map(|i| config.y.label(i)).collect();
    let title = format!(
        "{} | {} {} steps, CFG {}",
        config.prompt, config.sampler, config.steps, config.cfg_scale
    );
    let sheet = slider_grid::compose(&sheet_cells, &x_labels, &y_labels, Some(&title))?;
    let (first, _) = config.cell(0, 0);
    let parameters = format!(
        "{}, X/Y plot: {} x {}",
        first.a1111_parameters(),
        config.x.name(),
        config.y.name()
    );
    let text = [
        ("parameters".to_owned(), parameters),
        ("slider-run".to_owned(), config.settings_json().to_string()),
    ];
    std::fs::create_dir_all(output_dir).map_err(|source| XyPlotError::Io {
        path: output_dir.to_path_buf(),
        source,
    })?;
    let path = output_dir.join(GRID_FILE);
    slider_grid::write_png(&path, &sheet, &text)?;
    Ok(XyPlotOutcome {
        grid: path,
        cells: cells_total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use slider_models::sample::test_support::{random_lora, small_generator};

    fn json() -> Value {
        json!({
            "kind": "xy_plot", "base": {"File": "/m/base.safetensors"},
            "loras": [{"Node": "eyesize"}, {"File": "/l/style.safetensors"}],
            "prompt": "1girl", "negative_prompt": "lowres",
            "x": {"axis": "weight", "values": [-2.0, 0.5, 2]},
            "y": {"axis": "seed", "values": [1, 2]},
            "steps": 20, "cfg_scale": 7.0, "sampler": "euler_a", "width": 64, "height": 48
        })
    }

    fn decode(json: Value) -> Result<XyPlotParams, serde_json::Error> {
        serde_json::from_value(json)
    }

    fn params() -> XyPlotParams {
        decode(json()).unwrap()
    }

    fn resolve(input: &Input) -> Option<PathBuf> {
        match input {
            Input::File(f) => Some(f.clone()),
            Input::Node(n) if n == "elsewhere" => None,
            Input::Node(n) => Some(PathBuf::from(format!("/store/{n}/lora.safetensors"))),
        }
    }

    #[test]
    fn reads_the_recipe_parameters() {
        let c = XyPlotConfig::from_params(&params(), resolve).unwrap();
        assert_eq!(c.base, PathBuf::from("/m/base.safetensors"));
        let labels: Vec<&str> = c.loras.iter().map(|l| l.label.as_str()).collect();
        assert_eq!(labels, ["eyesize", "style"]);
        assert_eq!(
            c.loras[0].path,
            PathBuf::from("/store/eyesize/lora.safetensors")
        );
        assert_eq!(c.x, AxisValues::Weight(vec![-2.0, 0.5, 2.0]));
        assert_eq!(c.y, AxisValues::Seed(vec![1, 2]));
        assert_eq!((c.steps, c.width, c.height), (20, 64, 48));
        assert_eq!(c.sampler, SamplerKind::EulerAncestral);
    }

    #[test]
    fn refuses_parameters_it_cannot_plot() {
        // What the types cannot hold never decodes (the worker answers "malformed request").
        type JsonEdit = fn(&mut Value);
        let malformed: [(&str, JsonEdit); 4] = [
            ("unknown axis", |p| p["x"]["axis"] = json!("cfg")),
            ("negative seed", |p| p["y"]["values"] = json!([-1])),
            ("unknown sampler", |p| p["sampler"] = json!("plms")),
            ("prompt not a string", |p| p["prompt"] = json!(3)),
        ];
        for (label, edit) in malformed {
            let mut p = json();
            edit(&mut p);
            assert!(decode(p).is_err(), "{label}");
        }
        // What decodes but cannot be plotted is refused by name.
        type Edit = fn(&mut XyPlotParams);
        let cases: [(&str, Edit, &str); 5] = [
            (
                "unresolved lora",
                |p| p.loras[0] = Input::Node("elsewhere".into()),
                "no file for input",
            ),
            ("empty axis", |p| p.y = Axis::Seed(vec![]), "no values"),
            ("weight without loras", |p| p.loras.clear(), "needs a LoRA"),
            (
                "same axis twice",
                |p| p.y = Axis::Weight(vec![1.0]),
                "both vary",
            ),
            (
                "infinite weight",
                |p| p.x = Axis::Weight(vec![f64::INFINITY]),
                "finite",
            ),
        ];
        for (label, edit, want) in cases {
            let mut p = params();
            edit(&mut p);
            let err = XyPlotConfig::from_params(&p, resolve).unwrap_err();
            assert!(err.to_string().contains(want), "{label}: {err}");
        }
    }

    #[test]
    fn each_cell_changes_one_setting_per_axis() {
        let l = |label: &str| LoraInput {
            label: label.into(),
            path: PathBuf::from(format!("/{label}")),
        };
        let mut c = XyPlotConfig::from_params(&params(), resolve).unwrap();
        c.loras = vec![l("slider")];
        let names = |loras: &[(LoraInput, f64)]| -> Vec<(String, f64)> {
            loras.iter().map(|(l, w)| (l.label.clone(), *w)).collect()
        };
        // weight x seed: the first LoRA's weight by column, the seed by row.
        let (job, loras) = c.cell(1, 0);
        assert_eq!((job.seed, job.prompt.as_str()), (2, "1girl"));
        assert_eq!(names(&loras), [("slider".to_owned(), -2.0)]);
        // lora x prompt: `null` adds nothing; the seed stays 0.
        c.x = AxisValues::Lora(vec![None, Some(l("big"))]);
        c.y = AxisValues::Prompt(vec!["a".into(), "b".into()]);
        let (job, loras) = c.cell(1, 0);
        assert_eq!((job.seed, job.prompt.as_str()), (0, "b"));
        assert_eq!(names(&loras), [("slider".to_owned(), 1.0)]);
        let (_, loras) = c.cell(0, 1);
        assert_eq!(
            names(&loras),
            [("slider".to_owned(), 1.0), ("big".to_owned(), 1.0)]
        );
        assert_eq!(c.x.label(0), "none");
        assert_eq!(c.x.label(1), "big");
    }

    #[test]
    fn writes_a_labelled_sheet_with_the_settings() {
        let dir = tempfile::tempdir().unwrap();
        let g = small_generator(dir.path());
        let lora = random_lora(&g, 3);
        let lora_path = dir.path().join("slider.safetensors");
        lora.save(&lora_path, slider_lora::Precision::F32).unwrap();
        let config = XyPlotConfig {
            base: dir.path().join("base.safetensors"),
            base_config: None,
            loras: vec![LoraInput {
                label: "slider".into(),
                path: lora_path,
            }],
            prompt: "a face".into(),
            negative_prompt: String::new(),
            x: AxisValues::Weight(vec![-1.0, 1.0]),
            y: AxisValues::Seed(vec![1, 2]),
            steps: 2,
            cfg_scale: 4.0,
            sampler: SamplerKind::Euler,
            width: 32,
            height: 32,
            cell_scale: 3,
        };
        let mut seen = Vec::new();
        let out = dir.path().join("out");
        let outcome = run(&config, &out, &Device::flex(), |p| {
            seen.push((p.cell, p.cells))
        })
        .unwrap();
        assert_eq!(outcome.grid, out.join(GRID_FILE));
        assert_eq!(outcome.cells, 4);
        assert_eq!(seen, [(1, 4), (2, 4), (3, 4), (4, 4)]);
        let sheet = image::open(&outcome.grid).unwrap().to_rgb8();
        assert!(
            sheet.width() > 2 * 96 && sheet.height() > 2 * 96,
            "{:?}",
            sheet.dimensions()
        );
        // Every cell is drawn in 3 x 3 squares of one colour.
        let layout = slider_grid::layout(
            &vec![vec![image::RgbImage::new(96, 96); 2]; 2],
            &[config.x.label(0), config.x.label(1)],
            &[config.y.label(0), config.y.label(1)],
            Some(&format!("a face | {} 2 steps, CFG 4", config.sampler)),
        )
        .unwrap();
        let (x0, y0) = layout.cell_origin(1, 1);
        for y in 0..96 {
            for x in 0..96 {
                assert_eq!(
                    sheet.get_pixel(x0 + x, y0 + y),
                    sheet.get_pixel(x0 + x / 3 * 3, y0 + y / 3 * 3),
                    "({x}, {y})"
                );
            }
        }
        let text: BTreeMap<String, String> = slider_grid::read_png_text(&outcome.grid)
            .unwrap()
            .into_iter()
            .collect();
        assert!(
            text["parameters"].contains("Sampler: Euler, CFG scale: 4, Seed: 1, Size: 32x32"),
            "{}",
            text["parameters"]
        );
        let settings: Value = serde_json::from_str(&text["slider-run"]).unwrap();
        assert_eq!(
            settings["x"],
            json!({"axis": "weight", "values": [-1.0, 1.0]})
        );
        assert_eq!(settings["loras"], json!(["slider"]));
        assert_eq!(
            settings["cells"][1][0],
            json!({"seed": 2, "prompt": "a face", "loras": [["slider", -1.0]]})
        );
    }
}

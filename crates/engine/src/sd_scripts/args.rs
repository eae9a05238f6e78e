//! A `train` node's kohya-named parameters as sd-scripts' command line and dataset TOML:
//! every parameter goes to the option of the same name (`conv_dim`/`conv_alpha` through
//! `--network_args`, `resolution` and `train_batch_size` through the dataset, `images` and
//! `caption` as the dataset's files, `checkpoint_every` as `--save_every_n_steps` with
//! `--save_state`). `base_config`, which sd-scripts lacks, is refused by the recipe.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use slider_recipe::{Optimizer, Precision, TrainParams};

/// The base model's family, which picks the script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Sd1,
    Sdxl,
}

impl Family {
    pub fn script(self) -> &'static str {
        match self {
            Family::Sd1 => "train_network.py",
            Family::Sdxl => "sdxl_train_network.py",
        }
    }

    /// The LoRA layout a network trained on this family has.
    pub fn layout(self) -> slider_lora::layout::Layout {
        match self {
            Family::Sd1 => slider_lora::layout::Layout::Sd1,
            Family::Sdxl => slider_lora::layout::Layout::Sdxl,
        }
    }
}

/// The file name (without `.safetensors`) sd-scripts gives the LoRA and its states.
pub(crate) const OUTPUT_NAME: &str = "lora";

/// The files of one attempt: where the dataset, tokenizers and outputs are.
pub(crate) struct Paths<'a> {
    pub base: &'a Path,
    pub dataset_toml: &'a Path,
    pub tokenizers: &'a Path,
    pub output_dir: &'a Path,
    /// The state to continue from and the true step it was saved at.
    pub resume: Option<(&'a Path, u64)>,
}

/// The arguments after the script's path.
pub(crate) fn arguments(p: &TrainParams, paths: &Paths) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut opt = |name: &str, value: String| {
        a.push(format!("--{name}"));
        a.push(value);
    };
    opt("pretrained_model_name_or_path", show(paths.base));
    opt("dataset_config", show(paths.dataset_toml));
    opt("output_dir", show(paths.output_dir));
    opt("output_name", OUTPUT_NAME.into());
    opt("save_model_as", "safetensors".into());
    opt("network_module", "networks.lora".into());
    opt("network_dim", p.network_dim.to_string());
    opt("network_alpha", p.network_alpha.to_string());
    opt("learning_rate", p.learning_rate.to_string());
    if let Some(lr) = p.unet_lr {
        opt("unet_lr", lr.to_string());
    }
    opt("max_train_steps", p.max_train_steps.to_string());
    opt("lr_scheduler", p.lr_scheduler.name().into());
    opt("lr_warmup_steps", p.lr_warmup_steps.to_string());
    opt("optimizer_type", optimizer_type(p.optimizer_type).into());
    opt("seed", p.seed.to_string());
    if p.noise_offset != 0.0 {
        opt("noise_offset", p.noise_offset.to_string());
    }
    if let Some(gamma) = p.min_snr_gamma {
        opt("min_snr_gamma", gamma.to_string());
    }
    opt("mixed_precision", p.mixed_precision.name().into());
    opt("save_precision", precision(p.save_precision).into());
    if !p.training_comment.is_empty() {
        opt("training_comment", p.training_comment.clone());
    }
    opt("save_every_n_steps", p.checkpoint_every.to_string());
    // Older states and step files than the last two checkpoints are removed by sd-scripts.
    opt("save_last_n_steps_state", p.checkpoint_every.to_string());
    opt("save_last_n_steps", p.checkpoint_every.to_string());
    opt("tokenizer_cache_dir", show(paths.tokenizers));
    // One process: no data-loader workers to fork; the VAE encodes the images once.
    opt("max_data_loader_n_workers", "0".into());
    if let Some((state, step)) = paths.resume {
        opt("resume", show(state));
        // The true step: the state's own count restarts with every attempt.
        opt("initial_step", step.to_string());
    }
    let mut network_args = Vec::new();
    if let Some(dim) = p.conv_dim {
        network_args.push(format!("conv_dim={dim}"));
    }
    if let Some(alpha) = p.conv_alpha {
        network_args.push(format!("conv_alpha={alpha}"));
    }
    if !network_args.is_empty() {
        a.push("--network_args".into());
        a.extend(network_args);
    }
    if !p.optimizer_args.is_empty() {
        a.push("--optimizer_args".into());
        a.extend(p.optimizer_args.iter().map(|(k, v)| format!("{k}={v}")));
    }
    for (flag, on) in [
        ("save_state", true),
        ("cache_latents", true),
        ("sdpa", true),
        ("gradient_checkpointing", p.gradient_checkpointing),
        ("no_half_vae", p.no_half_vae),
        ("network_train_unet_only", p.network_train_unet_only),
    ] {
        if on {
            a.push(format!("--{flag}"));
        }
    }
    a
}

/// sd-scripts' name for an optimizer: built-in names as they are, CAME as the class of
/// came_pytorch (the reference implementation; `pip install came-pytorch`).
fn optimizer_type(o: Optimizer) -> &'static str {
    match o {
        Optimizer::AdamW => "AdamW",
        Optimizer::Came => "came_pytorch.CAME",
    }
}

fn precision(p: Precision) -> &'static str {
    match p {
        Precision::Float => "float",
        Precision::Fp16 => "fp16",
        Precision::Bf16 => "bf16",
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// The dataset TOML: one subset, the node's images with their captions in `image_dir`.
pub(crate) fn dataset_toml(p: &TrainParams, image_dir: &Path) -> String {
    format!(
        "[general]\ncaption_extension = \".txt\"\nshuffle_caption = false\nkeep_tokens = 0\n\n\
         [[datasets]]\nresolution = {}\nbatch_size = {}\nenable_bucket = false\n\n\
         [[datasets.subsets]]\nimage_dir = {}\nnum_repeats = 1\n",
        p.resolution,
        p.train_batch_size,
        toml_string(&image_dir.display().to_string())
    )
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One entry of a safetensors header: a tensor (with its shape) or the metadata map.
#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderEntry {
    Tensor { shape: Vec<usize> },
    Other(serde::de::IgnoredAny),
}

/// The family of a single-file checkpoint, from its safetensors header (never its values).
pub(crate) fn detect_family(path: &Path) -> Result<Family, String> {
    let header = read_header(path)?;
    let input_conv = "model.diffusion_model.input_blocks.0.0.weight";
    match header.get(input_conv) {
        Some(HeaderEntry::Tensor { shape }) if shape.as_slice() == [320, 4, 3, 3] => {}
        _ => {
            return Err(format!(
                "{} is not a full-size SD1.x or SDXL checkpoint (no `{input_conv}` of shape \
                 [320, 4, 3, 3]); sd-scripts builds those two architectures only",
                path.display()
            ));
        }
    }
    let has = |prefix: &str| header.keys().any(|k| k.starts_with(prefix));
    if has("conditioner.embedders.1.") {
        Ok(Family::Sdxl)
    } else if has("cond_stage_model.transformer.") {
        Ok(Family::Sd1)
    } else if has("cond_stage_model.model.") {
        Err(format!(
            "{} is an SD2.x checkpoint; `trainer: sd-scripts` handles SD1.x and SDXL",
            path.display()
        ))
    } else {
        Err(format!(
            "{} has no text encoder under `cond_stage_model.` (SD1.x) or `conditioner.` (SDXL)",
            path.display()
        ))
    }
}

fn read_header(path: &Path) -> Result<HashMap<String, HeaderEntry>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("reading {}: {e}", path.display());
    let mut f = File::open(path).map_err(|e| fail(&e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| fail(&e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(fail(&format!("a safetensors header of {len} bytes")));
    }
    let mut text = vec![0u8; len as usize];
    f.read_exact(&mut text).map_err(|e| fail(&e))?;
    serde_json::from_slice(&text).map_err(|e| fail(&e))
}

/// The image files of the dataset folder: `NNN.<ext>` with `NNN.txt` beside each.
pub(crate) fn dataset_file(index: usize, source: &Path) -> PathBuf {
    let ext = source
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "png".into());
    PathBuf::from(format!("{index:03}.{ext}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn params() -> TrainParams {
        let slider_recipe::NodeParams::Train(mut p) =
            crate::test_plans::train(slider_recipe::Input::File("/b.safetensors".into()))
        else {
            unreachable!()
        };
        p.conv_dim = Some(2);
        p.optimizer_args = BTreeMap::from([("weight_decay".into(), "0.01".into())]);
        p.checkpoint_every = 4;
        p
    }

    /// Every parameter reaches the option of its own name.
    #[test]
    fn parameters_keep_their_kohya_names() {
        let p = params();
        let paths = Paths {
            base: Path::new("/b.safetensors"),
            dataset_toml: Path::new("/w/dataset.toml"),
            tokenizers: Path::new("/w/tok"),
            output_dir: Path::new("/w/out"),
            resume: Some((Path::new("/w/out/lora-step00000004-state"), 8)),
        };
        let line = arguments(&p, &paths).join(" ");
        for want in [
            "--pretrained_model_name_or_path /b.safetensors",
            "--dataset_config /w/dataset.toml",
            "--network_dim 4",
            "--network_alpha 1",
            "--learning_rate 0.00005",
            "--max_train_steps 2",
            "--lr_scheduler constant",
            "--lr_warmup_steps 0",
            "--optimizer_type came_pytorch.CAME",
            "--seed 1",
            "--mixed_precision no",
            "--save_precision float",
            "--save_every_n_steps 4",
            "--save_state",
            "--network_train_unet_only",
            "--network_args conv_dim=2",
            "--optimizer_args weight_decay=0.01",
            "--resume /w/out/lora-step00000004-state --initial_step 8",
            "--tokenizer_cache_dir /w/tok",
        ] {
            assert!(line.contains(want), "`{want}` not in `{line}`");
        }
        for absent in [
            "--noise_offset",
            "--min_snr_gamma",
            "--unet_lr",
            "--gradient_checkpointing",
        ] {
            assert!(!line.contains(absent), "`{absent}` in `{line}`");
        }
    }

    #[test]
    fn the_dataset_names_resolution_batch_and_folder() {
        let mut p = params();
        p.resolution = 64;
        p.train_batch_size = 2;
        let toml = dataset_toml(&p, Path::new("/w/a \"b\"\\c"));
        assert!(toml.contains("resolution = 64\nbatch_size = 2\n"), "{toml}");
        assert!(toml.contains(r#"image_dir = "/w/a \"b\"\\c""#), "{toml}");
    }

    /// Writes a safetensors file holding only a header with these tensors (no data needed).
    fn header_file(dir: &Path, tensors: &[(&str, &[usize])]) -> PathBuf {
        let mut map = serde_json::Map::new();
        for (name, shape) in tensors {
            map.insert(
                (*name).into(),
                serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [0, 0]}),
            );
        }
        map.insert("__metadata__".into(), serde_json::json!({"a": "b"}));
        let text = serde_json::to_vec(&map).unwrap();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend(text);
        let path = dir.join(format!("{}.safetensors", tensors.len()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn families_from_headers() {
        let dir = tempfile::tempdir().unwrap();
        let conv: (&str, &[usize]) = (
            "model.diffusion_model.input_blocks.0.0.weight",
            &[320, 4, 3, 3],
        );
        let sd1 = header_file(
            dir.path(),
            &[conv, ("cond_stage_model.transformer.x", &[1])],
        );
        assert_eq!(detect_family(&sd1), Ok(Family::Sd1));
        let sdxl = header_file(
            dir.path(),
            &[
                conv,
                ("conditioner.embedders.0.x", &[1]),
                ("conditioner.embedders.1.y", &[1]),
            ],
        );
        assert_eq!(detect_family(&sdxl), Ok(Family::Sdxl));
        let sd2 = header_file(dir.path(), &[("cond_stage_model.model.x", &[1]), conv]);
        assert!(detect_family(&sd2).unwrap_err().contains("SD2"));
        let tiny = header_file(
            dir.path(),
            &[(
                "model.diffusion_model.input_blocks.0.0.weight",
                &[32, 4, 3, 3],
            )],
        );
        assert!(detect_family(&tiny).unwrap_err().contains("full-size"));
    }
}

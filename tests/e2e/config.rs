//! `--config` (a diffusers config.json, or a diffusers-layout folder) on `model inspect`,
//! `model forward` and `sample`: a checkpoint whose architecture its shapes cannot tell is
//! refused with a message naming what and `--config` (exit 1, never a panic), and works with
//! its config; a model that loads on a guess says what was assumed.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::slider_run;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A refusal: exit 1 (not 101, a panic, nor a signal) and a message holding every `needle`.
fn assert_refused(out: &Output, needles: &[&str], what: &str) {
    let (stdout, stderr) = text(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: expected a clean failure\n{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
    // miette wraps long lines (at spaces or after `/`): compare without whitespace.
    let squeeze = |s: &str| -> String {
        s.chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '│' | '×'))
            .collect()
    };
    let flat = squeeze(&stderr);
    for needle in needles {
        assert!(
            flat.contains(&squeeze(needle)),
            "{what}: no {needle:?} in\n{stderr}"
        );
    }
}

fn inspect(checkpoint: &Path, config: Option<&Path>) -> Output {
    let mut cmd = slider_run();
    cmd.args(["model", "inspect"]).arg(checkpoint);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.output().expect("binary runs")
}

/// (fixture, the GroupNorm line its config gives).
const UNUSUAL: [(&str, &str); 2] = [
    ("groups8", "groupnorm     8 groups, eps 1e-6"),
    ("heads8", "groupnorm     16 groups, eps 1e-5"),
];

#[test]
fn inspect_refuses_what_shapes_cannot_tell_and_reads_it_from_config() {
    for (name, groupnorm) in UNUSUAL {
        let ckpt = fixture(&format!("config/{name}.safetensors"));
        let config = fixture(&format!("config/{name}.config.json"));
        assert_refused(
            &inspect(&ckpt, None),
            &[
                "cannot read the UNet architecture",
                "GroupNorm's 32 groups",
                "shapes cannot tell GroupNorm's group count nor the attention heads",
                "config.json",
                "--config",
            ],
            name,
        );
        let out = inspect(&ckpt, Some(&config));
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{name}: {stdout}\n{stderr}");
        for want in [
            groupnorm,
            &format!("config        unet from {}", config.display()),
            "keys          all present, none unexpected",
        ] {
            assert!(stdout.contains(want), "{name}: no {want:?} in\n{stdout}");
        }
        assert!(!stdout.contains("assumed"), "{name}: {stdout}");
    }
    // heads8's per-level counts are one head width.
    let out = inspect(
        &fixture("config/heads8.safetensors"),
        Some(&fixture("config/heads8.config.json")),
    );
    assert!(text(&out).0.contains("heads Dim(8)"), "{}", text(&out).0);
}

#[test]
fn bad_configs_are_refused_with_their_file_key_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let groups8 = fixture("config/groups8.safetensors");
    let malformed = dir.path().join("malformed.json");
    std::fs::write(&malformed, "{\n  \"norm_num_groups\": 8,\n}\n").unwrap();
    let unsupported = dir.path().join("unsupported.json");
    std::fs::write(&unsupported, r#"{"class_embed_type": "timestep"}"#).unwrap();
    let rows: [(&Path, &[&str]); 4] = [
        (
            &malformed,
            &["malformed.json: not a diffusers config.json: trailing comma at line 3 column 1"],
        ),
        (
            &unsupported,
            &["unsupported.json: `class_embed_type` = \"timestep\": only null"],
        ),
        (
            &dir.path().join("absent.json"),
            &["absent.json: No such file or directory"],
        ),
        // Another model's config: the weights contradict it.
        (
            &fixture("config/heads8.config.json"),
            &[
                "heads8.config.json: `block_out_channels` = [16, 32] contradicts the checkpoint",
                "`model.diffusion_model.time_embed.0.weight` would have shape [64, 16]",
                "the checkpoint's has [96, 24]",
            ],
        ),
    ];
    for (config, needles) in rows {
        let what = config.display().to_string();
        assert_refused(&inspect(&groups8, Some(config)), needles, &what);
    }
}

/// `model forward` with the config gives diffusers' output; without it, a refusal.
#[test]
fn forward_with_config_equals_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    for (name, _) in UNUSUAL {
        let out_path = dir.path().join(format!("{name}.safetensors"));
        let forward = |config: bool| {
            let mut cmd = slider_run();
            cmd.args(["model", "forward"])
                .arg(fixture(&format!("config/{name}.safetensors")))
                .arg("--inputs")
                .arg(fixture(&format!("config/{name}_io.safetensors")))
                .arg("--out")
                .arg(&out_path);
            if config {
                cmd.arg("--config")
                    .arg(fixture(&format!("config/{name}.config.json")));
            }
            cmd.output().expect("binary runs")
        };
        assert_refused(&forward(false), &["GroupNorm", "--config"], name);
        assert!(!out_path.exists(), "{name}: nothing written on a refusal");
        let out = forward(true);
        assert!(out.status.success(), "{name}: {}", text(&out).1);
        let got = slider_models::forward::read_tensors(&out_path).unwrap();
        let io = slider_models::forward::read_tensors(&fixture(&format!(
            "config/{name}_io.safetensors"
        )))
        .unwrap();
        let (got, want) = (&got["noise_pred"], &io["expected.noise_pred"]);
        assert_eq!(got.shape, want.shape, "{name}");
        let diff: f64 = got
            .values
            .iter()
            .zip(&want.values)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let norm: f64 = want.values.iter().map(|b| f64::from(*b).powi(2)).sum();
        assert!(
            (diff / norm).sqrt() < 1e-4,
            "{name}: {}",
            (diff / norm).sqrt()
        );
    }
}

/// `tests/fixtures/sd1_tiny.safetensors` with its `slider.*` metadata taken out: a user's
/// checkpoint, whose heads and group counts only a guess can give.
fn without_metadata(dir: &Path) -> PathBuf {
    let bytes = std::fs::read(fixture("sd1_tiny.safetensors")).unwrap();
    let n = usize::try_from(u64::from_le_bytes(bytes[..8].try_into().unwrap())).unwrap();
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert!(header.remove("__metadata__").is_some());
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(n, b' ');
    let path = dir.join("user.safetensors");
    std::fs::write(&path, [&bytes[..8], &json, &bytes[8 + n..]].concat()).unwrap();
    path
}

fn write_json(path: &Path, json: serde_json::Value) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, json.to_string()).unwrap();
}

/// A model that loads on a guess says what was guessed; the config that gives it takes the
/// line away.
#[test]
fn inspect_says_what_it_assumed() {
    let out = inspect(&fixture("sd1_tiny.safetensors"), None);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(
            "assumed       UNet GroupNorm groups 32 (norm_num_groups) and eps 1e-5 (norm_eps); \
             VAE GroupNorm groups 32 (shapes cannot tell; --config gives them)"
        ),
        "{stdout}"
    );

    // Without our metadata, the text encoder's heads cannot be guessed for a 32-wide CLIP:
    // refused, naming the folder diffusers keeps its config in.
    let dir = tempfile::tempdir().unwrap();
    let user = without_metadata(dir.path());
    assert_refused(
        &inspect(&user, None),
        &[
            "cannot read the CLIP-L architecture: text encoder heads is 0",
            "shapes cannot tell a text encoder's attention heads",
            "text_encoder/config.json",
            "--config",
        ],
        "without metadata",
    );
    // Its text encoder's config alone: the UNet's heads are now a guess too, and said so.
    let folder = dir.path().join("diffusers");
    write_json(
        &folder.join("text_encoder/config.json"),
        serde_json::json!({
            "_class_name": "CLIPTextModel",
            "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 3, "num_attention_heads": 2,
            "max_position_embeddings": 77, "hidden_act": "quick_gelu"
        }),
    );
    let out = inspect(&user, Some(&folder));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(
            "assumed       UNet attention heads Count(8) (the Sd1 family's); UNet GroupNorm \
             groups 32 (norm_num_groups) and eps 1e-5 (norm_eps); VAE GroupNorm groups 32"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("config        text_l from"), "{stdout}");
    // --json lists the same.
    let json = crate::json_of(
        slider_run()
            .args(["model", "inspect", "--json", "--headers-only"])
            .arg(&user)
            .arg("--config")
            .arg(&folder),
    );
    assert_eq!(json["assumed"].as_array().map(Vec::len), Some(3), "{json}");
    assert!(json["configs"]["text_l"].is_string(), "{json}");
    // The UNet's and the VAE's configs too: nothing assumed.
    write_json(
        &folder.join("unet/config.json"),
        serde_json::json!({
            "block_out_channels": [32, 64], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 32, "attention_head_dim": 2, "norm_num_groups": 32
        }),
    );
    write_json(
        &folder.join("vae/config.json"),
        serde_json::json!({
            "_class_name": "AutoencoderKL", "block_out_channels": [32, 64],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
            "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32
        }),
    );
    let out = inspect(&user, Some(&folder));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains("assumed"), "{stdout}");
    assert!(stdout.contains("heads Count(2)"), "{stdout}");
}

/// `sample --config`: the config's group count is the one sampled with (another image than
/// the default's); a config the weights contradict is refused before sampling.
#[test]
fn sample_takes_the_config() {
    use slider_models::ModelSpec;
    use slider_models::checkpoint::{StoreDtype, write_random_checkpoint};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // ModelSpec::small_test(): UNet 32 x [1, 2, 2], attention at the first two levels.
    write_random_checkpoint(
        d.join("base.safetensors"),
        &ModelSpec::small_test(),
        StoreDtype::F32,
        3,
    )
    .unwrap();
    let unet = |groups: usize, context: usize| {
        serde_json::json!({
            "block_out_channels": [32, 64, 64], "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": context, "attention_head_dim": 4, "norm_num_groups": groups
        })
    };
    write_json(&d.join("g32.json"), unet(32, 32));
    write_json(&d.join("g16.json"), unet(16, 32));
    write_json(&d.join("wide.json"), unet(32, 64));
    let sample = |config: &str, out: &str| {
        slider_run()
            .current_dir(d)
            .args(["sample", "--base", "base.safetensors", "--config", config])
            .args(["--prompt", "a face", "--seed", "1", "--steps", "1"])
            .args(["--width", "32", "--height", "32", "--out", out])
            .output()
            .expect("binary runs")
    };
    for (config, out) in [("g32.json", "g32.png"), ("g16.json", "g16.png")] {
        let o = sample(config, out);
        assert!(o.status.success(), "{config}: {}", text(&o).1);
    }
    let read = |f: &str| std::fs::read(d.join(f)).unwrap();
    assert_ne!(read("g32.png"), read("g16.png"), "the group count is used");
    assert_refused(
        &sample("wide.json", "wide.png"),
        &["wide.json: `cross_attention_dim` = 64 contradicts the checkpoint"],
        "wide",
    );
    assert!(!d.join("wide.png").exists());
}

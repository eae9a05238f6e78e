//! Full-size SD1.5 and SDXL: random checkpoints written in the original layout by our writer
//! (f16, as most checkpoints users have), loaded with every key consumed, one forward pass of
//! each part. Heavy (SDXL needs ~15 GB of memory and minutes on 2 cores), so ignored by
//! default:
//!
//! `cargo test -p slider-worker --release --test full_size -- --ignored --nocapture`

use std::collections::BTreeMap;
use std::time::Instant;

use slider_models::tokenizer::Padding;
use slider_models::{
    Checkpoint, HostTensor, ModelSpec, StableDiffusion, StoreDtype, Tokenizer, check_keys,
    open_device, write_random_checkpoint,
};

fn host(shape: &[usize], f: impl Fn(usize) -> f32) -> HostTensor {
    let n = shape.iter().product();
    HostTensor {
        shape: shape.to_vec(),
        values: (0..n).map(f).collect(),
    }
}

fn run(spec: ModelSpec, name: &str) {
    let device = open_device("cpu").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.safetensors"));
    let t = Instant::now();
    write_random_checkpoint(&path, &spec, StoreDtype::F16, 7).unwrap();
    let size = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "{name}: wrote {:.2} GB in {:.1?}",
        size as f64 / 1e9,
        t.elapsed()
    );

    let ckpt = Checkpoint::open(&path).unwrap();
    let detected = ModelSpec::detect(&ckpt).unwrap();
    assert_eq!(detected, spec, "{name}: detected architecture");
    let report = check_keys(&ckpt, &detected);
    assert!(report.is_clean(), "{name}: {report}");
    let keys = ckpt.keys().count();
    let t = Instant::now();
    let model = StableDiffusion::load(&ckpt, &device).unwrap();
    eprintln!(
        "{name}: loaded {keys} tensors (all consumed) in {:.1?}",
        t.elapsed()
    );

    let tokenizer = Tokenizer::clip().unwrap();
    let ids = |pad| {
        let ids = tokenizer.tokenize("a photo of an old man, wrinkles", pad);
        host(&[1, 77], |i| ids[i] as f32)
    };
    let mut inputs = BTreeMap::new();
    inputs.insert("input_ids".to_string(), ids(Padding::EndToken));
    let sdxl = spec.text_g.is_some();
    if sdxl {
        inputs.insert("input_ids_2".to_string(), ids(Padding::Zero));
    }
    inputs.insert(
        "sample".to_string(),
        host(&[1, 4, 32, 32], |i| {
            ((i * 7919) % 1000) as f32 / 500.0 - 1.0
        }),
    );
    inputs.insert("timestep".to_string(), host(&[1], |_| 500.0));
    let context = spec.unet.context_dim;
    inputs.insert(
        "encoder_hidden_states".to_string(),
        host(&[1, 77, context], |i| ((i * 31) % 97) as f32 / 97.0 - 0.5),
    );
    if sdxl {
        inputs.insert(
            "text_embeds".to_string(),
            host(&[1, 1280], |i| (i % 13) as f32 / 13.0),
        );
        inputs.insert(
            "time_ids".to_string(),
            host(&[1, 6], |i| [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0][i]),
        );
    }
    inputs.insert(
        "image".to_string(),
        host(&[1, 3, 64, 64], |i| ((i * 13) % 255) as f32 / 127.5 - 1.0),
    );
    inputs.insert(
        "latents".to_string(),
        host(&[1, 4, 8, 8], |i| ((i * 17) % 23) as f32 / 23.0 - 0.5),
    );
    let t = Instant::now();
    let outputs = model.forward_named(&inputs, &device).unwrap();
    eprintln!("{name}: forward of every part in {:.1?}", t.elapsed());
    for (out, t) in &outputs {
        assert!(
            t.values.iter().all(|v| v.is_finite()),
            "{name}: {out} not finite"
        );
        eprintln!("{name}:   {out} {:?}", t.shape);
    }
    assert_eq!(outputs["noise_pred"].shape, vec![1, 4, 32, 32]);
    assert_eq!(outputs["decoded"].shape, vec![1, 3, 64, 64]);
    assert_eq!(outputs["latent_mean"].shape, vec![1, 4, 8, 8]);
    assert_eq!(
        outputs["cond.encoder_hidden_states"].shape,
        vec![1, 77, context]
    );
}

#[test]
#[ignore = "full size: minutes and ~15 GB; run with --ignored"]
fn full_size_sd15_loads_every_key_and_runs() {
    run(ModelSpec::sd15(), "sd15");
}

#[test]
#[ignore = "full size: minutes and ~15 GB; run with --ignored"]
fn full_size_sdxl_loads_every_key_and_runs() {
    run(ModelSpec::sdxl(), "sdxl");
}

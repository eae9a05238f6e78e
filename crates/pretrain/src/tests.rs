//! Pretraining, end to end on a tiny synthetic corpus: the losses fall, a stopped and resumed
//! run equals an uninterrupted one, and the written file is a loadable SD1 checkpoint whose
//! architecture is read back from its keys.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::Device;

use super::*;
use slider_models::checkpoint::Checkpoint;

/// Eight `size` x `size` images: a coloured disc (the "head") of varying size on a plain
/// background.
fn write_corpus_of(dir: &Path, size: u32) {
    std::fs::create_dir_all(dir).unwrap();
    let colours = [[200u8, 40, 40], [40, 40, 200], [240, 220, 60], [30, 30, 30]];
    for i in 0..8 {
        let radius = (3.0 + (i % 4) as f32) * size as f32 / 16.0;
        let colour = colours[i % 4];
        let centre = size as f32 / 2.0 - 0.5;
        let image = image::RgbImage::from_fn(size, size, |x, y| {
            let (dx, dy) = (x as f32 - centre, y as f32 - centre);
            if dx * dx + dy * dy < radius * radius {
                image::Rgb(colour)
            } else {
                image::Rgb([230, 230, 230])
            }
        });
        image.save(dir.join(format!("img{i}.png"))).unwrap();
        let caption = format!(
            "disc, {} colour, size {}",
            ["red", "blue", "yellow", "black"][i % 4],
            i % 4
        );
        std::fs::write(dir.join(format!("img{i}.txt")), caption).unwrap();
    }
}

fn write_corpus(dir: &Path) {
    write_corpus_of(dir, 16);
}

fn small_config(vae_steps: usize, unet_steps: usize) -> PretrainConfig {
    PretrainConfig {
        model: TinyBase::small_test(),
        seed: 11,
        vae_steps,
        unet_steps,
        vae_batch_size: 4,
        batch_size: 8,
        vae_lr: 2e-3,
        lr: 1e-3,
        warmup_steps: 2,
        checkpoint_every: 3,
        ..PretrainConfig::default()
    }
}

fn run(
    config: &PretrainConfig,
    corpus: &Corpus,
    work: &Path,
    out: &Path,
    stop_at: Option<(Stage, usize)>,
) -> (Result<PretrainOutcome, PretrainError>, Vec<Progress>) {
    let stop = AtomicBool::new(false);
    let mut seen = Vec::new();
    let result = pretrain(
        config,
        corpus,
        work,
        out,
        &Device::flex(),
        |p| {
            seen.push(p);
            if stop_at == Some((p.stage, p.step)) {
                stop.store(true, Ordering::Relaxed);
            }
        },
        &stop,
    );
    (result, seen)
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len() as f32
}

#[test]
fn a_few_steps_reduce_both_losses_and_write_a_loadable_sd1_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write_corpus_of(&dir.path().join("corpus"), 32);
    let device = Device::flex();
    let corpus = Corpus::load(&dir.path().join("corpus"), &device).unwrap();
    assert_eq!((corpus.len(), corpus.size), (8, 32));
    assert_eq!(corpus.captions[1], "disc, blue colour, size 1");

    // The autoencoder trains on 16x16 crops of the 32x32 images.
    let config = PretrainConfig {
        vae_crop: 16,
        ..small_config(25, 25)
    };
    let out = dir.path().join("base.safetensors");
    let (result, seen) = run(&config, &corpus, &dir.path().join("work"), &out, None);
    let outcome = result.unwrap();
    let losses = |stage: Stage| -> Vec<f32> {
        seen.iter()
            .filter(|p| p.stage == stage)
            .map(|p| p.loss)
            .collect()
    };
    for stage in [Stage::Vae, Stage::Unet] {
        let l = losses(stage);
        assert_eq!(l.len(), 25, "{stage}");
        let (first, last) = (mean(&l[..5]), mean(&l[20..]));
        assert!(last < 0.9 * first, "{stage}: {first} -> {last}");
    }
    assert!(outcome.latent_std > 0.0);

    let ckpt = Checkpoint::open(&out).unwrap();
    let spec = ModelSpec::detect(&ckpt).unwrap();
    assert_eq!(spec, config.model.spec());
    let model = StableDiffusion::load(&ckpt, &device).unwrap();
    assert_eq!(
        ckpt.dtype("model.diffusion_model.out.2.weight").as_deref(),
        Some("F16")
    );

    // SD1's scaling factor gives unit-variance latents on the corpus.
    let vae = model.vae.as_ref().unwrap();
    let std = latent_scale::latent_std(vae, &corpus.images, 8) * f64::from(SD1_SCALING_FACTOR);
    assert!((std - 1.0).abs() < 0.02, "scaled latent std {std}");

    let csv = std::fs::read_to_string(&outcome.loss_csv).unwrap();
    assert_eq!(csv.lines().count(), 1 + 50);
    assert!(csv.starts_with("stage,step,loss,lr\nvae,1,"));

    let preview_config = PreviewConfig {
        captions: vec!["disc, red colour".into(), String::new()],
        seeds: vec![0, 1, 2],
        steps: 4,
        cfg_scale: 3.0,
        size: 32,
    };
    let grid = preview::generate(&model, &preview_config, &device).unwrap();
    assert_eq!(grid.len(), 2);
    assert!(grid.iter().all(|row| row.len() == 3));
    assert_eq!(grid[0][0].dimensions(), (32, 32));
    // The preview is the sampler's image: the same job through the generator gives it.
    let generator = slider_models::sample::Generator::from_model(model.clone(), &device).unwrap();
    let job = slider_models::sample::SampleJob {
        prompt: "disc, red colour".into(),
        negative_prompt: String::new(),
        seed: 1,
        steps: 4,
        cfg_scale: 3.0,
        sampler: slider_models::sample::SamplerKind::Ddim,
        width: 32,
        height: 32,
    };
    assert_eq!(grid[0][1], generator.generate(&job, &[]).unwrap());
    let sheet = dir.path().join("samples.png");
    preview::write_samples(&sheet, &grid, &preview_config).unwrap();
    let (w, h) = image::open(&sheet).unwrap().to_rgb8().dimensions();
    assert!(w > 3 * 32 && h > 2 * 32, "{w}x{h}");
}

#[test]
fn stopped_and_resumed_runs_equal_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    write_corpus(&dir.path().join("corpus"));
    let corpus = Corpus::load(&dir.path().join("corpus"), &Device::flex()).unwrap();
    let config = small_config(5, 5);

    let whole = dir.path().join("whole.safetensors");
    let (r, _) = run(&config, &corpus, &dir.path().join("w1"), &whole, None);
    r.unwrap();

    // Stopped once in each stage (one between checkpoints), then resumed to the end.
    let resumed = dir.path().join("resumed.safetensors");
    let work = dir.path().join("w2");
    for stop_at in [(Stage::Vae, 2), (Stage::Unet, 4)] {
        let (r, _) = run(&config, &corpus, &work, &resumed, Some(stop_at));
        match r {
            Err(PretrainError::Stopped { stage, step }) => assert_eq!((stage, step), stop_at),
            other => panic!("expected a stop at {stop_at:?}, got {other:?}"),
        }
    }
    let (r, seen) = run(&config, &corpus, &work, &resumed, None);
    r.unwrap();
    assert_eq!(seen.len(), 1, "only the last UNet step is left");

    assert_eq!(
        std::fs::read(&whole).unwrap(),
        std::fs::read(&resumed).unwrap()
    );
    assert_eq!(
        std::fs::read(dir.path().join("w1").join(LOSS_FILE)).unwrap(),
        std::fs::read(work.join(LOSS_FILE)).unwrap()
    );

    // Other settings refuse to resume from this work dir.
    let other = PretrainConfig { lr: 3e-4, ..config };
    let (r, _) = run(&other, &corpus, &work, &resumed, None);
    assert!(matches!(r, Err(PretrainError::Resume { .. })), "{r:?}");
}

#[test]
fn settings_that_cannot_train_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_corpus(&dir.path().join("corpus"));
    let corpus = Corpus::load(&dir.path().join("corpus"), &Device::flex()).unwrap();
    let base = small_config(1, 1);
    let cases: Vec<(&str, PretrainConfig)> = vec![
        (
            "unet channels",
            PretrainConfig {
                model: TinyBase {
                    unet_channels: 48,
                    ..base.model.clone()
                },
                ..base.clone()
            },
        ),
        (
            "vae channels",
            PretrainConfig {
                model: TinyBase {
                    vae_channels: 16,
                    ..base.model.clone()
                },
                ..base.clone()
            },
        ),
        (
            "text heads",
            PretrainConfig {
                model: TinyBase {
                    text_heads: 3,
                    ..base.model.clone()
                },
                ..base.clone()
            },
        ),
        (
            "batch sizes",
            PretrainConfig {
                batch_size: 0,
                ..base.clone()
            },
        ),
        (
            "caption dropout",
            PretrainConfig {
                caption_dropout: 1.0,
                ..base.clone()
            },
        ),
        (
            "vae ch_mult",
            PretrainConfig {
                model: TinyBase {
                    vae_ch_mult: vec![1, 0, 1],
                    ..base.model.clone()
                },
                ..base.clone()
            },
        ),
        (
            "min-SNR gamma",
            PretrainConfig {
                min_snr_gamma: Some(0.0),
                ..base.clone()
            },
        ),
    ];
    for (what, config) in cases {
        let (r, _) = run(
            &config,
            &corpus,
            &dir.path().join("w"),
            &dir.path().join("o"),
            None,
        );
        match r {
            Err(PretrainError::Config(m)) => assert!(m.contains(what), "{what}: {m}"),
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn corpus_problems_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = Corpus::load(&empty, &device).unwrap_err().to_string();
    assert!(err.contains("no .png images"), "{err}");

    let orphan = dir.path().join("orphan");
    write_corpus(&orphan);
    std::fs::remove_file(orphan.join("img3.txt")).unwrap();
    let err = Corpus::load(&orphan, &device).unwrap_err().to_string();
    assert!(err.contains("img3.txt") && err.contains("caption"), "{err}");
}

/// Where a UNet step's time goes (`cargo test -p slider-worker --lib pretrain::tests::step_profile -- --ignored --nocapture`).
#[test]
#[ignore = "diagnostic: prints timings"]
fn step_profile() {
    use std::time::Instant;
    let device = Device::flex();
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let mut config = PretrainConfig::default();
    config.model.unet_heads = env("HEADS", 4);
    config.model.unet_channels = env("CH", 32);
    config.batch_size = env("BATCH", 32);
    let spec = config.model.spec();
    let parts = fresh_parts(&spec, 0, &device);
    let b = config.batch_size;
    let latents = Tensor::<4>::zeros([64, 4, 16, 16], &device);
    let tok = Tokenizer::clip().unwrap();
    let ids: Vec<i64> = tok
        .tokenize("1girl, red hair, side view", Padding::EndToken)
        .into_iter()
        .map(i64::from)
        .collect();
    let captions = vec![ids.clone(); 64];
    let ns = NoiseSchedule::stable_diffusion();
    let mut opt = AdamW::new(AdamWConfig::default());
    let (mut unet, mut text) = (parts.unet, parts.text);
    for round in 0..3 {
        let t0 = Instant::now();
        let batch = UnetBatch::draw(&config, round, &latents, &captions, &ids, &device);
        let noisy = ns
            .add_noise(batch.x0, batch.noise.clone(), &batch.timesteps)
            .unwrap();
        let tu = params::tracked(unet);
        let tt = params::tracked(text);
        let t1 = Instant::now();
        let context = tt.forward(batch.ids).last;
        let _ = context.clone().sum().into_scalar::<f32>();
        let t2 = Instant::now();
        let t = Tensor::<1>::from_data(
            TensorData::new(batch.timesteps.iter().map(|&t| t as f32).collect(), [b]),
            &device,
        );
        let pred = tu.forward(noisy, t, context, None);
        let loss = (pred - batch.noise).square().mean();
        let _ = loss.clone().into_scalar::<f32>();
        let t3 = Instant::now();
        let mut grads = loss.backward();
        let t4 = Instant::now();
        let mut named = NamedGrads::new();
        params::take_grads(&tu, "unet", &mut grads, &mut named).unwrap();
        params::take_grads(&tt, "text", &mut grads, &mut named).unwrap();
        params::clip_grad_norm(&mut named, 1.0);
        let t5 = Instant::now();
        unet = params::adamw_step(tu, "unet", &mut named, &mut opt, 1e-4).unwrap();
        text = params::adamw_step(tt, "text", &mut named, &mut opt, 1e-4).unwrap();
        let _ = named_count(&unet);
        let t6 = Instant::now();
        eprintln!(
            "round {round}: setup {:?} text fwd {:?} unet fwd {:?} backward {:?} grads+clip {:?} adamw {:?}",
            t1 - t0,
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t5 - t4,
            t6 - t5
        );
    }
}

fn named_count(unet: &UNet) -> usize {
    params::named_values(unet, "unet").len()
}

/// Can the autoencoder learn flat colours? Eight 16x16 images, each one solid colour, trained
/// whole (`CH=32|64 cargo test -p slider-worker --lib pretrain::tests::solid_colours --
/// --ignored --nocapture`).
#[test]
#[ignore = "diagnostic: minutes of VAE training"]
fn solid_colours() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let dir = tempfile::tempdir().unwrap();
    let colours = [
        [200u8, 40, 40],
        [40, 40, 200],
        [240, 220, 60],
        [30, 30, 30],
        [40, 200, 60],
        [250, 250, 250],
        [200, 120, 200],
        [90, 60, 20],
    ];
    for (i, c) in colours.iter().enumerate() {
        image::RgbImage::from_pixel(16, 16, image::Rgb(*c))
            .save(dir.path().join(format!("{i}.png")))
            .unwrap();
        std::fs::write(dir.path().join(format!("{i}.txt")), "x").unwrap();
    }
    let device = Device::flex();
    let corpus = Corpus::load(dir.path(), &device).unwrap();
    let config = PretrainConfig {
        model: TinyBase {
            vae_channels: env("CH", 64),
            vae_ch_mult: std::env::var("MULT").map_or_else(
                |_| TinyBase::default().vae_ch_mult,
                |v| v.split(',').filter_map(|m| m.parse().ok()).collect(),
            ),
            ..TinyBase::default()
        },
        vae_batch_size: 8,
        vae_crop: 0,
        warmup_steps: 10,
        vae_steps: env("STEPS", 100),
        ..PretrainConfig::default()
    };
    let parts = fresh_parts(&config.model.spec(), 0, &device);
    let mut vae = parts.vae;
    let mut opt = AdamW::new(AdamWConfig::default());
    let schedule = LrSchedule::new(ScheduleKind::Cosine, 1e-3, 10, config.vae_steps).unwrap();
    for step in 0..config.vae_steps {
        let (v, loss) =
            vae_step(&config, &corpus, vae, step, &mut opt, schedule.lr_at(step)).unwrap();
        vae = v;
        if step % 20 == 0 {
            eprintln!("step {step} loss {loss}");
        }
    }
    let (mean, _) = vae.encode(corpus.images.clone());
    let err = (vae.decode(mean) - corpus.images.clone())
        .abs()
        .mean()
        .into_scalar::<f32>();
    eprintln!(
        "ch {} ch_mult {:?}: mean absolute error {err}",
        config.model.vae_channels, config.model.vae_ch_mult
    );
}

/// Min-SNR weights are `min(SNR, gamma) / SNR` <= 1 per sample: a huge gamma weights every
/// timestep 1 (the plain loss, to the bit), a small one lowers the loss of the same batch.
#[test]
fn min_snr_weighting_scales_each_samples_loss() {
    let device = Device::flex();
    let base = small_config(1, 1);
    let spec = base.model.spec();
    let n = 4;
    let latents = standard_normal(&mut ChaCha8Rng::seed_from_u64(3), [n, 4, 8, 8], &device);
    let tokenizer = Tokenizer::clip().unwrap();
    let captions: Vec<Vec<i64>> = (0..n)
        .map(|i| token_ids(&tokenizer, &format!("disc {i}")))
        .collect();
    let empty = token_ids(&tokenizer, "");
    let loss_with = |gamma: Option<f64>| {
        let config = PretrainConfig {
            min_snr_gamma: gamma,
            ..base.clone()
        };
        let parts = fresh_parts(&spec, config.seed, &device);
        let batch = UnetBatch::draw(&config, 0, &latents, &captions, &empty, &device);
        let mut optimizer = AdamW::new(AdamWConfig::default());
        let (_, _, loss) = unet_step(
            &config,
            parts.unet,
            parts.text,
            batch,
            &NoiseSchedule::stable_diffusion(),
            &mut optimizer,
            1e-4,
            0,
        )
        .unwrap();
        loss
    };
    let plain = loss_with(None);
    assert_eq!(loss_with(Some(1e9)), plain);
    let weighted = loss_with(Some(0.05));
    assert!(
        weighted < plain,
        "gamma 0.05 gave {weighted}, unweighted {plain}"
    );
}

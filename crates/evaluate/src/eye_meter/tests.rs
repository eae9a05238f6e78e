//! The eye meter's specification: rank statistics, file round trips and refusals, training
//! reproducibility, and the shipped weights reading rendered eye sizes in the right order.

use std::path::PathBuf;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use slider_toyworld::{Identity, View, render};

use super::net::Net;
use super::*;
use crate::stats::spearman;
use safetensors::tensor::TensorView;

fn cpu() -> Device {
    slider_models::open_device("cpu").unwrap()
}

fn shipped() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/eye-meter/eye-meter.safetensors")
}

#[test]
fn decode_keeps_present_slots_and_scales_to_the_input() {
    let row = [0.7, 2.0, 0.1, 0.2, 0.3, 0.4, -1.0, 0.5, 0.5, 0.6, 0.6];
    let reading = decode(&row, 128, 64);
    assert_eq!(reading.eye_size, 0.7);
    assert_eq!(reading.eye_boxes, vec![[12.8, 12.8, 38.4, 25.6]]);
}

#[test]
fn save_then_load_gives_the_same_readings_and_bytes() {
    let device = cpu();
    let meter = EyeMeter::from_net(
        Net::init(&mut ChaCha8Rng::seed_from_u64(3), &device),
        Default::default(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    meter.save(&path, &[("note".into(), "x".into())]).unwrap();
    let loaded = EyeMeter::load(&path, &device).unwrap();
    assert_eq!(loaded.metadata().get("note").map(String::as_str), Some("x"));
    let image = render(&Identity::from_seed(1), View::Front, 0.5, 64).image;
    assert_eq!(
        meter.measure(&image).unwrap(),
        loaded.measure(&image).unwrap()
    );
    let again = dir.path().join("again.safetensors");
    loaded.save(&again, &[]).unwrap();
    let resaved = EyeMeter::load(&again, &device).unwrap();
    assert_eq!(
        resaved.measure(&image).unwrap(),
        meter.measure(&image).unwrap()
    );
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size < 1_000_000, "{size} bytes");
}

#[test]
fn files_that_are_not_eye_meters_are_refused_with_the_reason() {
    let device = cpu();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.safetensors");
    EyeMeter::from_net(
        Net::init(&mut ChaCha8Rng::seed_from_u64(0), &device),
        Default::default(),
    )
    .save(&good, &[])
    .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rewrite = |drop: &str, reshape: Option<(&str, Vec<usize>)>, format: &str| {
        let mut views = Vec::new();
        let mut store = Vec::new();
        for (name, view) in file.tensors() {
            if name == drop {
                continue;
            }
            let mut shape = view.shape().to_vec();
            let mut data = view.data().to_vec();
            if let Some((n, s)) = &reshape
                && *n == name
            {
                shape = s.clone();
                data.truncate(s.iter().product::<usize>() * 4);
            }
            store.push((name, shape, data));
        }
        for (name, shape, data) in &store {
            views.push((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
            ));
        }
        let meta = HashMap::from([(KEY_FORMAT.to_string(), format.to_string())]);
        let path = dir.path().join("bad.safetensors");
        std::fs::write(&path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
        match EyeMeter::load(&path, &device) {
            Err(EyeMeterError::Format { reason, .. }) => reason,
            other => panic!("expected a format error, got {other:?}"),
        }
    };
    let cases = [
        (rewrite("", None, "something-else"), "metadata `format`"),
        (
            rewrite("fc2.bias", None, FORMAT),
            "tensor `fc2.bias` is missing",
        ),
        (
            rewrite("", Some(("conv1.bias", vec![8])), FORMAT),
            "tensor `conv1.bias` has shape [8], expected [16]",
        ),
    ];
    for (reason, expected) in cases {
        assert!(reason.contains(expected), "{reason}");
    }
    let missing = EyeMeter::load(&dir.path().join("nope.safetensors"), &device);
    assert!(matches!(missing, Err(EyeMeterError::Read { .. })));
}

#[test]
fn training_is_reproducible_from_the_seed() {
    let device = cpu();
    let config = EyeMeterTrainConfig {
        seed: 9,
        steps: 2,
        batch: 3,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for run in 0..2 {
        let mut seen = Vec::new();
        let (meter, report) =
            train_eye_meter(&config, &device, &mut |p| seen.push(p.step)).unwrap();
        assert_eq!(seen, [1, 2]);
        assert_eq!(report.losses.len(), 2);
        let path = dir.path().join(format!("{run}.safetensors"));
        meter.save(&path, &[]).unwrap();
        files.push(std::fs::read(path).unwrap());
    }
    assert_eq!(files[0], files[1]);
}

#[test]
fn the_learning_rate_warms_up_then_decays() {
    let c = EyeMeterTrainConfig {
        steps: 100,
        warmup: 10,
        learning_rate: 1.0,
        ..Default::default()
    };
    let cases = [(0, 0.1), (9, 1.0), (10, 1.0), (55, 0.525), (100, 0.05)];
    for (step, lr) in cases {
        assert!(
            (c.lr_at(step) - lr).abs() < 1e-9,
            "step {step}: {}",
            c.lr_at(step)
        );
    }
}

#[test]
fn augmentations_phase_in_after_a_quarter_of_the_steps() {
    let c = EyeMeterTrainConfig {
        steps: 100,
        ..Default::default()
    };
    let cases = [(0, 0.0), (25, 0.0), (30, 0.16), (50, 0.8), (99, 0.8)];
    for (step, share) in cases {
        let got = c.augmented_share(step);
        assert!((got - share).abs() < 1e-9, "step {step}: {got}");
    }
}

/// The shipped meter: measured size rises with the rendered eye size in every view, on
/// identities it never saw, and it finds the right number of eyes.
#[test]
fn shipped_meter_reads_rendered_eye_sizes_in_order() {
    let device = cpu();
    let meter = EyeMeter::load(&shipped(), &device).unwrap();
    let sizes = [0.0, 0.25, 0.5, 0.75, 1.0];
    for view in View::ALL {
        let mut truth = Vec::new();
        let mut measured = Vec::new();
        for seed in 1000..1004 {
            let id = Identity::from_seed(seed);
            let images: Vec<RgbImage> = sizes
                .iter()
                .map(|&e| render(&id, view, e, 64).image)
                .collect();
            let readings = meter.measure_batch(&images).unwrap();
            let expected_eyes = if view == View::Side { 1 } else { 2 };
            for (e, r) in sizes.iter().zip(&readings) {
                assert_eq!(
                    r.eye_boxes.len(),
                    expected_eyes,
                    "{view} seed {seed} size {e}"
                );
                truth.push(*e as f64);
                measured.push(r.eye_size as f64);
            }
            let span = readings[4].eye_size - readings[0].eye_size;
            assert!(span > 0.4, "{view} seed {seed}: {readings:?}");
        }
        let rho = spearman(&truth, &measured).unwrap();
        assert!(rho > 0.9, "{view}: Spearman {rho}");
    }
}

#[test]
fn shipped_meter_reads_any_image_size() {
    let device = cpu();
    let meter = EyeMeter::load(&shipped(), &device).unwrap();
    let id = Identity::from_seed(77);
    let small = meter
        .measure(&render(&id, View::Front, 0.9, 64).image)
        .unwrap();
    let large = meter
        .measure(&render(&id, View::Front, 0.9, 256).image)
        .unwrap();
    assert!(
        (small.eye_size - large.eye_size).abs() < 0.15,
        "{small:?} {large:?}"
    );
    for (a, b) in small.eye_boxes.iter().zip(&large.eye_boxes) {
        for (x, y) in a.iter().zip(b) {
            assert!((x * 4.0 - y).abs() < 8.0, "{a:?} {b:?}");
        }
    }
    let empty = meter.measure(&RgbImage::new(0, 0));
    assert!(matches!(empty, Err(EyeMeterError::EmptyImage { .. })));
}

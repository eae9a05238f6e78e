//! Test support shared by the crates that check numerics against the reference fixtures of
//! `tests/fixtures/optim/` (written by `tests/fixtures/make_optim_fixtures.py`): reading a
//! fixture file and the two error measures REFERENCE.md gives tolerances in. Not part of the
//! API.

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::Device;

use crate::HostTensor;

/// Parameter names of the fixtures, in order.
pub const PARAMS: [&str; 5] = ["p0", "p1", "p2", "p3", "p4"];

pub fn device() -> Device {
    Device::flex()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/optim")
        .join(name)
}

/// Every tensor of a fixture file as f32, and its metadata.
pub fn read(name: &str) -> (BTreeMap<String, HostTensor>, BTreeMap<String, String>) {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k}");
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (
                k,
                HostTensor {
                    shape: v.shape().to_vec(),
                    values,
                },
            )
        })
        .collect();
    (tensors, metadata)
}

/// `||a - b|| / ||b||`.
pub fn rel_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// `max |a - b| / max |b|`.
pub fn max_error(a: &[f32], b: &[f32]) -> f64 {
    let max_abs = |v: &mut dyn Iterator<Item = f64>| v.fold(0.0f64, f64::max);
    let diff = max_abs(
        &mut a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs()),
    );
    diff / max_abs(&mut b.iter().map(|&y| f64::from(y).abs())).max(f64::MIN_POSITIVE)
}

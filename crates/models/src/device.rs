//! Run-time choice of the compute device: `cpu` (burn's pure-Rust `flex` backend, always
//! built), `wgpu:N` and `cuda:N` (only in builds with the `wgpu`/`cuda` features). A device the
//! build lacks, or that the machine lacks, is an error that says which and what to do.

use burn::tensor::{Device, Tensor};

/// Why a device string cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Not `cpu`, `wgpu:N` or `cuda:N`.
    #[error("unknown device `{0}`: expected `cpu`, `wgpu:N` or `cuda:N`")]
    Unknown(String),
    /// The backend is not compiled into this build.
    #[error(
        "device `{device}` needs the `{feature}` feature, which this build lacks; rebuild with `cargo build --release --features {feature}`"
    )]
    NotBuilt {
        /// The requested device.
        device: String,
        /// The cargo feature that adds it.
        feature: &'static str,
    },
    /// The backend is built but the device does not answer.
    #[error("device `{device}` is not available on this machine: {reason}")]
    Unavailable {
        /// The requested device.
        device: String,
        /// What the backend said.
        reason: String,
    },
}

/// Parses `cpu`, `wgpu:N` or `cuda:N` (a bare `wgpu`/`cuda` means index 0).
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    let spec = spec.trim();
    let (kind, index) = match spec.split_once(':') {
        Some((k, i)) => {
            let index: usize = i.parse().map_err(|_| DeviceError::Unknown(spec.into()))?;
            (k, index)
        }
        None => (spec, 0),
    };
    match kind {
        "cpu" if index == 0 => Ok(Device::flex()),
        "wgpu" => wgpu_device(spec, index),
        "cuda" => cuda_device(spec, index),
        _ => Err(DeviceError::Unknown(spec.into())),
    }
}

/// [`parse_device`], then a tiny computation on the device, so a device the machine lacks fails
/// here with a message instead of deep inside a forward pass.
pub fn open_device(spec: &str) -> Result<Device, DeviceError> {
    let device = parse_device(spec)?;
    let probe = device.clone();
    let answer = std::panic::catch_unwind(move || {
        Tensor::<1>::ones([4], &probe)
            .sum()
            .into_data()
            .try_to_vec::<f32>()
            .ok()
    });
    match answer {
        Ok(Some(v)) if v.first() == Some(&4.0) => Ok(device),
        Ok(_) => Err(DeviceError::Unavailable {
            device: spec.into(),
            reason: "a test computation returned a wrong result".into(),
        }),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the backend failed to start".into());
            Err(DeviceError::Unavailable {
                device: spec.into(),
                reason,
            })
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_device(_spec: &str, index: usize) -> Result<Device, DeviceError> {
    Ok(Device::wgpu(burn::tensor::DeviceKind::DiscreteGpu(index)))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(spec: &str, _index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        device: spec.into(),
        feature: "wgpu",
    })
}

#[cfg(feature = "cuda")]
fn cuda_device(_spec: &str, index: usize) -> Result<Device, DeviceError> {
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(spec: &str, _index: usize) -> Result<Device, DeviceError> {
    Err(DeviceError::NotBuilt {
        device: spec.into(),
        feature: "cuda",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert!(open_device("cpu").is_ok());
        for bad in ["gpu", "cpu:1", "cuda:x", "", "tpu:0"] {
            assert!(
                matches!(parse_device(bad), Err(DeviceError::Unknown(_))),
                "{bad}"
            );
        }
        #[cfg(not(feature = "cuda"))]
        assert_eq!(
            parse_device("cuda:0").err(),
            Some(DeviceError::NotBuilt {
                device: "cuda:0".into(),
                feature: "cuda"
            })
        );
        #[cfg(not(feature = "wgpu"))]
        assert_eq!(
            parse_device("wgpu:1").err(),
            Some(DeviceError::NotBuilt {
                device: "wgpu:1".into(),
                feature: "wgpu"
            })
        );
    }
}

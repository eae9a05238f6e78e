//! Run-time choice of the compute device: `cpu` (burn's pure-Rust `flex` backend, always
//! built), `wgpu:auto` / `wgpu:cpu` / `wgpu:N` and `cuda:N` (only in builds with the
//! `wgpu`/`cuda` features). A device the build lacks, or that the machine lacks, is an error
//! that says which and what to do.
//!
//! | spec | device |
//! |---|---|
//! | `cpu` | burn's `flex` CPU backend |
//! | `wgpu`, `wgpu:auto` | the best wgpu adapter: a GPU when there is one, else a software Vulkan (lavapipe) |
//! | `wgpu:cpu` | a software adapter only (lavapipe; Debian's `mesa-vulkan-drivers`) |
//! | `wgpu:N` | the N-th discrete GPU (cubecl counts adapters per type) |
//! | `cuda`, `cuda:N` | the N-th CUDA device |

use burn::tensor::{Device, Tensor};

/// Why a device string cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    /// Not one of the specs above.
    #[error("unknown device `{0}`: expected `cpu`, `wgpu:auto`, `wgpu:cpu`, `wgpu:N` or `cuda:N`")]
    Unknown(String),
    /// The backend is not compiled into this build.
    #[error(
        "device `{device}` needs the `{feature}` feature, which this build lacks; rebuild with `cargo build --release --features slider-cli/{feature}`"
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

/// Which wgpu adapter a `wgpu:...` spec names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuAdapter {
    /// `wgpu`, `wgpu:auto`: the best adapter there is, software included.
    Auto,
    /// `wgpu:cpu`: a software adapter (lavapipe).
    Software,
    /// `wgpu:N`: the N-th discrete GPU.
    Discrete(usize),
}

/// A parsed device spec, before any backend is touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `cpu`: flex.
    Cpu,
    /// `wgpu...`.
    Wgpu(WgpuAdapter),
    /// `cuda:N`.
    Cuda(usize),
}

impl DeviceSpec {
    /// Parses a spec of the table in the module comment (surrounding blanks ignored).
    pub fn parse(spec: &str) -> Result<Self, DeviceError> {
        let spec = spec.trim();
        let unknown = || DeviceError::Unknown(spec.into());
        let (kind, rest) = match spec.split_once(':') {
            Some((kind, rest)) => (kind, Some(rest)),
            None => (spec, None),
        };
        let index = |rest: &str| rest.parse::<usize>().map_err(|_| unknown());
        match (kind, rest) {
            ("cpu", None) => Ok(Self::Cpu),
            ("wgpu", None | Some("auto")) => Ok(Self::Wgpu(WgpuAdapter::Auto)),
            ("wgpu", Some("cpu")) => Ok(Self::Wgpu(WgpuAdapter::Software)),
            ("wgpu", Some(n)) => Ok(Self::Wgpu(WgpuAdapter::Discrete(index(n)?))),
            ("cuda", None) => Ok(Self::Cuda(0)),
            ("cuda", Some(n)) => Ok(Self::Cuda(index(n)?)),
            _ => Err(unknown()),
        }
    }
}

/// Parses a device spec (see the module comment) into a burn device, without touching it.
pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    match DeviceSpec::parse(spec)? {
        DeviceSpec::Cpu => Ok(Device::flex()),
        DeviceSpec::Wgpu(adapter) => wgpu_device(spec.trim(), adapter),
        DeviceSpec::Cuda(index) => cuda_device(spec.trim(), index),
    }
}

/// How many wgpu adapters this machine offers (software ones included), without opening any:
/// 0 when the build has no `wgpu` feature or the machine no Vulkan driver. Tests use it to
/// skip (or, under CI, fail) where there is nothing to run on.
pub fn wgpu_adapter_count() -> usize {
    #[cfg(feature = "wgpu")]
    {
        Device::enumerate(burn::tensor::DeviceType::Wgpu).len()
    }
    #[cfg(not(feature = "wgpu"))]
    {
        0
    }
}

/// What a device is, for logs and reports: `cpu (flex)`, or the adapter's own name
/// (`llvmpipe (LLVM 15.0.6, 256 bits)`, `NVIDIA H100 PCIe`). Opens the device.
pub fn describe_device(device: &Device) -> String {
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    if let Some(identity) = device.identity() {
        return identity.name;
    }
    format!("{device:?}")
}

/// [`parse_device`], then a tiny computation on the device, so a device the machine lacks fails
/// here with a message instead of deep inside a forward pass.
pub fn open_device(spec: &str) -> Result<Device, DeviceError> {
    let device = parse_device(spec)?;
    let probe = device.clone();
    let answer = std::panic::catch_unwind(move || {
        // `convert`: a device configured for f16 answers in f16.
        Tensor::<1>::ones([4], &probe)
            .sum()
            .into_data()
            .convert::<f32>()
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
fn wgpu_device(_spec: &str, adapter: WgpuAdapter) -> Result<Device, DeviceError> {
    use burn::tensor::DeviceKind;
    // cubecl picks adapters by exact type: `DiscreteGpu(N)` never takes lavapipe, whose type
    // is `Cpu`; `DefaultDevice` takes the best there is, software included.
    Ok(Device::wgpu(match adapter {
        WgpuAdapter::Auto => DeviceKind::DefaultDevice,
        WgpuAdapter::Software => DeviceKind::Cpu,
        WgpuAdapter::Discrete(index) => DeviceKind::DiscreteGpu(index),
    }))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(spec: &str, _adapter: WgpuAdapter) -> Result<Device, DeviceError> {
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
    fn device_specs() {
        use WgpuAdapter::*;
        for (spec, want) in [
            ("cpu", DeviceSpec::Cpu),
            (" cpu ", DeviceSpec::Cpu),
            ("wgpu", DeviceSpec::Wgpu(Auto)),
            ("wgpu:auto", DeviceSpec::Wgpu(Auto)),
            ("wgpu:cpu", DeviceSpec::Wgpu(Software)),
            ("wgpu:0", DeviceSpec::Wgpu(Discrete(0))),
            ("wgpu:3", DeviceSpec::Wgpu(Discrete(3))),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:1", DeviceSpec::Cuda(1)),
        ] {
            assert_eq!(DeviceSpec::parse(spec), Ok(want), "{spec}");
        }
    }

    #[test]
    fn device_strings() {
        assert!(open_device("cpu").is_ok());
        for bad in [
            "gpu",
            "cpu:1",
            "cpu:0",
            "cuda:x",
            "",
            "tpu:0",
            "wgpu:",
            "wgpu:gpu",
            "cuda:auto",
            "wgpu:-1",
        ] {
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
        for spec in ["wgpu:1", "wgpu:auto", "wgpu:cpu"] {
            assert_eq!(
                parse_device(spec).err(),
                Some(DeviceError::NotBuilt {
                    device: spec.into(),
                    feature: "wgpu"
                })
            );
        }
        #[cfg(not(feature = "wgpu"))]
        assert_eq!(wgpu_adapter_count(), 0);
    }
}

//! One adapted module of a LoRA: its up/down factors, alpha and shape, held as f32.
//! The delta it applies to the base weight is `alpha / rank * up @ down`.

use std::fmt;

/// The base layer a module adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleKind {
    /// `nn.Linear`: down `[rank, in]`, up `[out, rank]`.
    Linear,
    /// `nn.Conv2d` with a `kh x kw` kernel: down `[rank, in, kh, kw]`, up `[out, rank, 1, 1]`.
    Conv { kh: usize, kw: usize },
}

impl ModuleKind {
    /// Elements of the kernel window (1 for linear layers and 1x1 convs).
    pub fn window(self) -> usize {
        match self {
            ModuleKind::Linear => 1,
            ModuleKind::Conv { kh, kw } => kh * kw,
        }
    }

    /// A conv with a kernel larger than 1x1 (kohya's "conv2d_3x3", uses `new_conv_rank`).
    pub fn is_spatial_conv(self) -> bool {
        matches!(self, ModuleKind::Conv { kh, kw } if (kh, kw) != (1, 1))
    }

    pub fn is_conv(self) -> bool {
        matches!(self, ModuleKind::Conv { .. })
    }
}

impl fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleKind::Linear => write!(f, "linear"),
            ModuleKind::Conv { kh, kw } => write!(f, "conv{kh}x{kw}"),
        }
    }
}

/// How a module's alpha is (or will be) stored in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlphaStorage {
    /// A 0-dim float tensor in the file's save precision (training, resize, merge).
    Float,
    /// A 0-dim I64 tensor: kohya's `svd_merge_lora.py` stores `torch.tensor(new_rank)`,
    /// an integer, and does not cast it to the save precision.
    Integer,
    /// No alpha tensor at all; kohya then uses alpha = rank.
    Absent,
}

/// The element type of a tensor in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorDtype {
    F16,
    Bf16,
    F32,
}

impl fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorDtype::F16 => "F16",
            TensorDtype::Bf16 => "BF16",
            TensorDtype::F32 => "F32",
        })
    }
}

/// True when no value is infinite or NaN (exponent bits all ones). Branch-free over
/// chunks, so the compiler vectorises it; the caller finds the offending index only when
/// this fails.
fn all_finite(values: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    let mut chunks = values.chunks_exact(16);
    let mut bad = 0u32;
    for c in &mut chunks {
        for x in c {
            bad |= u32::from(x.to_bits() & EXPONENT == EXPONENT);
        }
    }
    for x in chunks.remainder() {
        bad |= u32::from(x.to_bits() & EXPONENT == EXPONENT);
    }
    bad == 0
}

/// One adapted module, f32 in memory, factors stored row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    pub kind: ModuleKind,
    /// Output features / channels.
    pub out_dim: usize,
    /// Input features / channels (not multiplied by the kernel window).
    pub in_dim: usize,
    pub rank: usize,
    /// `[out_dim, rank]`, row-major.
    pub up: Vec<f32>,
    /// `[rank, in_dim * kh * kw]`, row-major.
    pub down: Vec<f32>,
    pub alpha: f32,
    pub alpha_storage: AlphaStorage,
    /// Element type of the weights in the file this module was read from (F32 when computed).
    pub dtype: TensorDtype,
}

impl Module {
    /// Columns of the flattened delta: `in_dim * kh * kw`.
    pub fn in_flat(&self) -> usize {
        self.in_dim * self.kind.window()
    }

    /// `alpha / rank`, the factor between `up @ down` and the applied delta.
    pub fn scale(&self) -> f32 {
        if self.rank == 0 {
            0.0
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// The kohya tensor shape of `lora_up.weight`.
    pub fn up_shape(&self) -> Vec<usize> {
        match self.kind {
            ModuleKind::Linear => vec![self.out_dim, self.rank],
            ModuleKind::Conv { .. } => vec![self.out_dim, self.rank, 1, 1],
        }
    }

    /// The kohya tensor shape of `lora_down.weight`.
    pub fn down_shape(&self) -> Vec<usize> {
        match self.kind {
            ModuleKind::Linear => vec![self.rank, self.in_dim],
            ModuleKind::Conv { kh, kw } => vec![self.rank, self.in_dim, kh, kw],
        }
    }

    /// The shape of the base weight this module adapts, e.g. `linear [640, 2048]` or
    /// `conv3x3 [320, 320, 3, 3]`: what layout errors print.
    pub fn base_shape_label(&self) -> String {
        match self.kind {
            ModuleKind::Linear => format!("linear [{}, {}]", self.out_dim, self.in_dim),
            ModuleKind::Conv { kh, kw } => {
                format!(
                    "{} [{}, {}, {kh}, {kw}]",
                    self.kind, self.out_dim, self.in_dim
                )
            }
        }
    }

    /// True when both modules adapt a base weight of the same kind and shape.
    pub fn same_base_shape(&self, other: &Module) -> bool {
        self.kind == other.kind && self.out_dim == other.out_dim && self.in_dim == other.in_dim
    }

    /// Checks what every operation relies on: non-zero dimensions and rank, factor lengths
    /// that match the shape, finite values and alpha. Modules read from files always pass;
    /// this guards modules built in code before they reach an operation or a tensor
    /// library (a length that disagrees with the shape would otherwise panic there).
    pub fn check(&self) -> Result<(), String> {
        if self.rank == 0 || self.out_dim == 0 || self.in_flat() == 0 {
            return Err(format!(
                "a dimension is 0 (rank {}, {})",
                self.rank,
                self.base_shape_label()
            ));
        }
        let want_up = self.out_dim.checked_mul(self.rank);
        if want_up != Some(self.up.len()) {
            return Err(format!(
                "up factor has {} values but its shape {:?} needs {}",
                self.up.len(),
                self.up_shape(),
                want_up.map_or("more than usize".to_string(), |n| n.to_string())
            ));
        }
        let want_down = self.in_flat().checked_mul(self.rank);
        if want_down != Some(self.down.len()) {
            return Err(format!(
                "down factor has {} values but its shape {:?} needs {}",
                self.down.len(),
                self.down_shape(),
                want_down.map_or("more than usize".to_string(), |n| n.to_string())
            ));
        }
        if !self.alpha.is_finite() {
            return Err(format!("alpha {} is not finite", self.alpha));
        }
        for (what, values) in [("up", &self.up), ("down", &self.down)] {
            if all_finite(values) {
                continue;
            }
            if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(format!("{what} factor holds {v} at flat index {i}"));
            }
        }
        Ok(())
    }

    /// Frobenius norm of the applied delta `scale * up @ down`, computed without
    /// materialising the `out x in` matrix.
    pub fn delta_norm(&self) -> f64 {
        crate::linalg::product_frobenius_norm(
            &self.up,
            &self.down,
            self.out_dim,
            self.rank,
            self.in_flat(),
        ) * f64::from(self.scale()).abs()
    }
}

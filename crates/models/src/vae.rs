//! The KL autoencoder (LDM's `AutoencoderKL`): the encoder gives the mean and log-variance of
//! the latent distribution, the decoder turns latents back into images. Field names follow the
//! original layout (`encoder.down.N.block.M`, `mid.attn_1`, `quant_conv`, ...).

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::silu;
use burn::tensor::ops::PadMode;
use burn::tensor::{Device, FloatDType, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::{
    GROUP_NORM_GROUPS, NormF32, compute_dtype, conv2d, from_tokens, group_norm,
    multi_head_attention, to_tokens, upsample_nearest_2x,
};

/// Latent scaling of SD1.x: `latents = mean * 0.18215` before the UNet.
pub const SD1_SCALING_FACTOR: f32 = 0.18215;
/// Latent scaling of SDXL.
pub const SDXL_SCALING_FACTOR: f32 = 0.13025;

/// Hyper-parameters of the autoencoder, named as in the LDM configs. `norm_num_groups` is left
/// out of the serialisation at its default, so stored metadata keeps its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Channels of the first level.
    pub ch: usize,
    /// Channel multiplier per level.
    pub ch_mult: Vec<usize>,
    /// Res blocks per level in the encoder (one more in the decoder).
    pub num_res_blocks: usize,
    /// Latent channels.
    pub z_channels: usize,
    /// GroupNorm's group count everywhere in the autoencoder (diffusers' `norm_num_groups`,
    /// 32). Shapes cannot tell it.
    #[serde(default = "default_groups", skip_serializing_if = "is_default_groups")]
    pub norm_num_groups: usize,
}

fn default_groups() -> usize {
    GROUP_NORM_GROUPS
}

fn is_default_groups(g: &usize) -> bool {
    *g == GROUP_NORM_GROUPS
}

impl VaeConfig {
    /// The autoencoder of SD1.x and SDXL (same architecture, different weights).
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 4,
            norm_num_groups: GROUP_NORM_GROUPS,
        }
    }

    /// A small autoencoder of the same architecture (two levels, 2x downsampling).
    pub fn tiny() -> Self {
        Self {
            in_channels: 3,
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            z_channels: 4,
            norm_num_groups: GROUP_NORM_GROUPS,
        }
    }

    /// Whether an autoencoder of this configuration can be built: widths non-zero, at least
    /// one level, every level's width divisible by GroupNorm's `norm_num_groups`.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("in_channels", self.in_channels),
            ("ch", self.ch),
            ("num_res_blocks", self.num_res_blocks),
            ("z_channels", self.z_channels),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("VAE {name} is 0"));
        }
        if self.ch_mult.is_empty() || self.ch_mult.contains(&0) {
            return Err(format!(
                "VAE channel multipliers {:?} must be non-empty and non-zero",
                self.ch_mult
            ));
        }
        let groups = self.norm_num_groups;
        if groups == 0 {
            return Err("VAE norm_num_groups is 0".into());
        }
        for (level, &mult) in self.ch_mult.iter().enumerate() {
            let ch = self.ch.checked_mul(mult).ok_or("VAE width overflows")?;
            if !ch.is_multiple_of(groups) {
                return Err(format!(
                    "VAE level {level} has {ch} channels, not divisible by GroupNorm's \
                     {groups} groups (norm_num_groups)"
                ));
            }
        }
        Ok(())
    }

    /// Builds the autoencoder with fresh (lazy) parameters.
    pub fn init(&self, device: &Device) -> Vae {
        let levels = self.ch_mult.len();
        let g = self.norm_num_groups;
        let ch_at = |level: usize| self.ch * self.ch_mult[level];

        let mut down = Vec::with_capacity(levels);
        let mut block_in = self.ch;
        for level in 0..levels {
            let block_out = ch_at(level);
            let mut block = Vec::new();
            for _ in 0..self.num_res_blocks {
                block.push(VaeResBlock::new(block_in, block_out, g, device));
                block_in = block_out;
            }
            down.push(DownLevel {
                block,
                downsample: (level + 1 < levels).then(|| VaeDownsample {
                    conv: Conv2dConfig::new([block_in, block_in], [3, 3])
                        .with_stride([2, 2])
                        .with_padding(PaddingConfig2d::Valid)
                        .init(device),
                }),
            });
        }
        let z2 = 2 * self.z_channels;
        let encoder = Encoder {
            conv_in: conv2d(self.in_channels, self.ch, 3, 1, device),
            down,
            mid: Mid::new(block_in, g, device),
            norm_out: group_norm(g, block_in, 1e-6, device),
            conv_out: conv2d(block_in, z2, 3, 1, device),
        };

        let top = ch_at(levels - 1);
        let mut block_in = top;
        let mut up: Vec<Option<UpLevel>> = (0..levels).map(|_| None).collect();
        for level in (0..levels).rev() {
            let block_out = ch_at(level);
            let mut block = Vec::new();
            for _ in 0..=self.num_res_blocks {
                block.push(VaeResBlock::new(block_in, block_out, g, device));
                block_in = block_out;
            }
            up[level] = Some(UpLevel {
                block,
                upsample: (level > 0).then(|| VaeUpsample {
                    conv: conv2d(block_in, block_in, 3, 1, device),
                }),
            });
        }
        let decoder = Decoder {
            conv_in: conv2d(self.z_channels, top, 3, 1, device),
            mid: Mid::new(top, g, device),
            up: up.into_iter().flatten().collect(),
            norm_out: group_norm(g, block_in, 1e-6, device),
            conv_out: conv2d(block_in, self.in_channels, 3, 1, device),
        };

        Vae {
            encoder,
            decoder,
            quant_conv: conv2d(z2, z2, 1, 1, device),
            post_quant_conv: conv2d(self.z_channels, self.z_channels, 1, 1, device),
        }
    }
}

/// The autoencoder.
#[derive(Module, Debug)]
pub struct Vae {
    /// Image -> moments.
    pub encoder: Encoder,
    /// Latents -> image.
    pub decoder: Decoder,
    /// 1x1 conv on the encoder's moments.
    pub quant_conv: Conv2d,
    /// 1x1 conv on latents before the decoder.
    pub post_quant_conv: Conv2d,
}

impl Vae {
    /// Mean and log-variance (clamped to [-30, 20]) of the latent distribution of `image`
    /// `[b, 3, h, w]` in [-1, 1]. Unscaled: multiply the mean by the scaling factor for the UNet.
    /// The image enters in the dtype of the weights; the moments leave in f32.
    pub fn encode(&self, image: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let image = image.cast(compute_dtype(&self.quant_conv.weight));
        let moments = self
            .quant_conv
            .forward(self.encoder.forward(image))
            .cast(FloatDType::F32);
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().expect("chunk(2) yields two halves");
        let mean = halves.pop().expect("chunk(2) yields two halves");
        (mean, logvar.clamp(-30.0, 20.0))
    }

    /// Image `[b, 3, 8h, 8w]` (for the SD autoencoder) from unscaled latents `[b, 4, h, w]`.
    /// The latents enter in the dtype of the weights; the image leaves in f32.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let latents = latents.cast(compute_dtype(&self.post_quant_conv.weight));
        self.decoder
            .forward(self.post_quant_conv.forward(latents))
            .cast(FloatDType::F32)
    }
}

/// The encoder.
#[derive(Module, Debug)]
pub struct Encoder {
    /// First conv.
    pub conv_in: Conv2d,
    /// `down.N`.
    pub down: Vec<DownLevel>,
    /// `mid`.
    pub mid: Mid,
    /// Final norm.
    pub norm_out: GroupNorm,
    /// To mean and log-variance.
    pub conv_out: Conv2d,
}

impl Encoder {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut h = self.conv_in.forward(x);
        for level in &self.down {
            for block in &level.block {
                h = block.forward(h);
            }
            if let Some(down) = &level.downsample {
                // LDM pads right and bottom only, then convolves without padding.
                let padded = h.pad([(0, 1), (0, 1)], PadMode::Constant(0.0));
                h = down.conv.forward(padded);
            }
        }
        h = self.mid.forward(h);
        self.conv_out.forward(silu(self.norm_out.forward_f32(h)))
    }
}

/// The decoder.
#[derive(Module, Debug)]
pub struct Decoder {
    /// First conv.
    pub conv_in: Conv2d,
    /// `mid`.
    pub mid: Mid,
    /// `up.N`, indexed by level (0 = full resolution) and run from the deepest.
    pub up: Vec<UpLevel>,
    /// Final norm.
    pub norm_out: GroupNorm,
    /// To the image.
    pub conv_out: Conv2d,
}

impl Decoder {
    fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let mut h = self.mid.forward(self.conv_in.forward(z));
        for level in self.up.iter().rev() {
            for block in &level.block {
                h = block.forward(h);
            }
            if let Some(up) = &level.upsample {
                h = up.conv.forward(upsample_nearest_2x(h));
            }
        }
        self.conv_out.forward(silu(self.norm_out.forward_f32(h)))
    }
}

/// One encoder level.
#[derive(Module, Debug)]
pub struct DownLevel {
    /// `block.N`.
    pub block: Vec<VaeResBlock>,
    /// Every level but the last halves the resolution.
    pub downsample: Option<VaeDownsample>,
}

/// One decoder level.
#[derive(Module, Debug)]
pub struct UpLevel {
    /// `block.N`.
    pub block: Vec<VaeResBlock>,
    /// Every level but the first doubles the resolution.
    pub upsample: Option<VaeUpsample>,
}

/// Stride-2 conv after asymmetric padding.
#[derive(Module, Debug)]
pub struct VaeDownsample {
    /// The convolution (its own padding is replaced by the asymmetric one).
    pub conv: Conv2d,
}

/// Nearest 2x then conv.
#[derive(Module, Debug)]
pub struct VaeUpsample {
    /// The convolution.
    pub conv: Conv2d,
}

/// Res block, attention, res block.
#[derive(Module, Debug)]
pub struct Mid {
    /// First res block.
    pub block_1: VaeResBlock,
    /// Single-head self-attention over pixels.
    pub attn_1: AttnBlock,
    /// Second res block.
    pub block_2: VaeResBlock,
}

impl Mid {
    fn new(ch: usize, g: usize, device: &Device) -> Self {
        Self {
            block_1: VaeResBlock::new(ch, ch, g, device),
            attn_1: AttnBlock::new(ch, g, device),
            block_2: VaeResBlock::new(ch, ch, g, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.block_2
            .forward(self.attn_1.forward(self.block_1.forward(x)))
    }
}

/// Res block without time embedding (GroupNorm eps 1e-6).
#[derive(Module, Debug)]
pub struct VaeResBlock {
    /// First norm.
    pub norm1: GroupNorm,
    /// First conv.
    pub conv1: Conv2d,
    /// Second norm.
    pub norm2: GroupNorm,
    /// Second conv.
    pub conv2: Conv2d,
    /// 1x1 conv when the channel count changes.
    pub nin_shortcut: Option<Conv2d>,
}

impl VaeResBlock {
    fn new(c_in: usize, c_out: usize, g: usize, device: &Device) -> Self {
        Self {
            norm1: group_norm(g, c_in, 1e-6, device),
            conv1: conv2d(c_in, c_out, 3, 1, device),
            norm2: group_norm(g, c_out, 1e-6, device),
            conv2: conv2d(c_out, c_out, 3, 1, device),
            nin_shortcut: (c_in != c_out).then(|| conv2d(c_in, c_out, 1, 1, device)),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.conv1.forward(silu(self.norm1.forward_f32(x.clone())));
        let h = self.conv2.forward(silu(self.norm2.forward_f32(h)));
        match &self.nin_shortcut {
            Some(skip) => skip.forward(x) + h,
            None => x + h,
        }
    }
}

/// Single-head attention over pixels with 1x1-conv projections.
#[derive(Module, Debug)]
pub struct AttnBlock {
    /// Norm.
    pub norm: GroupNorm,
    /// Query.
    pub q: Conv2d,
    /// Key.
    pub k: Conv2d,
    /// Value.
    pub v: Conv2d,
    /// Output projection.
    pub proj_out: Conv2d,
}

impl AttnBlock {
    fn new(ch: usize, g: usize, device: &Device) -> Self {
        Self {
            norm: group_norm(g, ch, 1e-6, device),
            q: conv2d(ch, ch, 1, 1, device),
            k: conv2d(ch, ch, 1, 1, device),
            v: conv2d(ch, ch, 1, 1, device),
            proj_out: conv2d(ch, ch, 1, 1, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let n = self.norm.forward_f32(x.clone());
        let q = to_tokens(self.q.forward(n.clone()));
        let k = to_tokens(self.k.forward(n.clone()));
        let v = to_tokens(self.v.forward(n));
        let out = from_tokens(multi_head_attention(q, k, v, 1, false), h, w);
        x + self.proj_out.forward(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::param_keys;

    #[test]
    fn sd_autoencoder_has_the_reference_parameter_count() {
        let vae = VaeConfig::sd().init(&Device::flex());
        let keys = param_keys(&vae);
        let count: usize = keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(count, 83_653_863);
        let names: Vec<String> = keys.into_iter().map(|(k, _)| k.key).collect();
        for want in [
            "encoder.down.0.block.0.norm1.weight",
            "encoder.down.0.downsample.conv.weight",
            "encoder.down.1.block.0.nin_shortcut.weight",
            "encoder.mid.attn_1.q.weight",
            "decoder.up.3.block.2.conv2.bias",
            "decoder.up.1.upsample.conv.weight",
            "decoder.up.0.block.0.nin_shortcut.weight",
            "quant_conv.weight",
            "post_quant_conv.bias",
        ] {
            assert!(names.iter().any(|k| k == want), "missing {want}");
        }
        assert!(
            !names
                .iter()
                .any(|k| k == "decoder.up.0.upsample.conv.weight")
        );
    }
}

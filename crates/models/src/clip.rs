//! CLIP text encoders in the two layouts checkpoints use: Hugging Face's `CLIPTextModel`
//! (ViT-L/14, SD1 and SDXL's first encoder) and open_clip's text tower (ViT-bigG, SDXL's second
//! encoder, fused `in_proj` attention and a `text_projection` for the pooled output). Both
//! return the last layer after the final norm, the penultimate layer (no norm) and the
//! pooled embedding at the end-of-text token.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, Linear};
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::layers::{layer_norm, linear, multi_head_attention};

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP bigG).
    Gelu,
}

impl Activation {
    fn apply(self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Activation::QuickGelu => x.clone() * sigmoid(x * 1.702),
            Activation::Gelu => gelu(x),
        }
    }
}

/// Hyper-parameters of a CLIP text transformer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Token vocabulary.
    pub vocab_size: usize,
    /// Width.
    pub hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Positions (77).
    pub max_positions: usize,
    /// MLP activation.
    pub activation: Activation,
    /// Width of the pooled projection (open_clip layout only).
    pub projection_dim: Option<usize>,
}

impl TextConfig {
    /// Whether a text encoder of this configuration can be built: sizes non-zero, the width
    /// divisible by the heads, room for the 77 positions the tokenizer fills.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("intermediate", self.intermediate),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("text encoder {name} is 0"));
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(format!(
                "text encoder width {} does not split into {} attention heads",
                self.hidden, self.heads
            ));
        }
        if self.max_positions < crate::tokenizer::CONTEXT_LENGTH {
            return Err(format!(
                "text encoder has {} positions; the tokenizer fills {}",
                self.max_positions,
                crate::tokenizer::CONTEXT_LENGTH
            ));
        }
        if let Some(0) = self.projection_dim {
            return Err("text encoder projection width is 0".into());
        }
        Ok(())
    }

    /// OpenAI CLIP ViT-L/14's text encoder (SD1, SDXL's first encoder).
    pub fn clip_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden: 768,
            layers: 12,
            heads: 12,
            intermediate: 3072,
            max_positions: 77,
            activation: Activation::QuickGelu,
            projection_dim: None,
        }
    }

    /// OpenCLIP ViT-bigG/14's text encoder (SDXL's second encoder).
    pub fn clip_g() -> Self {
        Self {
            vocab_size: 49408,
            hidden: 1280,
            layers: 32,
            heads: 20,
            intermediate: 5120,
            max_positions: 77,
            activation: Activation::Gelu,
            projection_dim: Some(1280),
        }
    }

    /// A CLIP-L-layout encoder with fresh (lazy) parameters.
    pub fn init_hf(&self, device: &Device) -> ClipTextModel {
        let d = self.hidden;
        ClipTextModel {
            text_model: ClipTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
                    position_embedding: EmbeddingConfig::new(self.max_positions, d).init(device),
                },
                encoder: ClipEncoder {
                    layers: (0..self.layers)
                        .map(|_| ClipLayer {
                            self_attn: ClipAttention {
                                q_proj: linear(d, d, true, device),
                                k_proj: linear(d, d, true, device),
                                v_proj: linear(d, d, true, device),
                                out_proj: linear(d, d, true, device),
                            },
                            layer_norm1: layer_norm(d, device),
                            mlp: ClipMlp {
                                fc1: linear(d, self.intermediate, true, device),
                                fc2: linear(self.intermediate, d, true, device),
                            },
                            layer_norm2: layer_norm(d, device),
                        })
                        .collect(),
                },
                final_layer_norm: layer_norm(d, device),
            },
            heads: self.heads,
            quick_gelu: self.activation == Activation::QuickGelu,
        }
    }

    /// An open_clip-layout encoder with fresh (lazy) parameters.
    pub fn init_open_clip(&self, device: &Device) -> OpenClipText {
        let d = self.hidden;
        let proj = self.projection_dim.unwrap_or(d);
        let zeros2 = |shape: [usize; 2]| Initializer::Zeros.init::<2, _>(shape, device);
        OpenClipText {
            token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
            positional_embedding: zeros2([self.max_positions, d]),
            transformer: OpenClipTransformer {
                resblocks: (0..self.layers)
                    .map(|_| OpenClipBlock {
                        ln_1: layer_norm(d, device),
                        attn: FusedAttention {
                            in_proj_weight: zeros2([3 * d, d]),
                            in_proj_bias: Initializer::Zeros.init::<1, _>([3 * d], device),
                            out_proj: linear(d, d, true, device),
                        },
                        ln_2: layer_norm(d, device),
                        mlp: OpenClipMlp {
                            c_fc: linear(d, self.intermediate, true, device),
                            c_proj: linear(self.intermediate, d, true, device),
                        },
                    })
                    .collect(),
            },
            ln_final: layer_norm(d, device),
            text_projection: zeros2([d, proj]),
            heads: self.heads,
            quick_gelu: self.activation == Activation::QuickGelu,
        }
    }
}

/// What a text encoder gives the rest of the pipeline.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// Last layer after the final layer norm `[b, 77, d]` (SD1's conditioning).
    pub last: Tensor<3>,
    /// Second-to-last layer, no norm `[b, 77, d]` (SDXL's conditioning).
    pub penultimate: Tensor<3>,
    /// The normed last layer at the end-of-text token, through `text_projection` when the
    /// model has one `[b, d or proj]` (SDXL's `text_embeds` from bigG).
    pub pooled: Tensor<2>,
}

/// Hugging Face `CLIPTextModel` (its state dict under `text_model.`).
#[derive(Module, Debug)]
pub struct ClipTextModel {
    /// `text_model`.
    pub text_model: ClipTransformer,
    heads: usize,
    quick_gelu: bool,
}

/// `CLIPTextTransformer`.
#[derive(Module, Debug)]
pub struct ClipTransformer {
    /// Token and position embeddings.
    pub embeddings: ClipEmbeddings,
    /// The layers.
    pub encoder: ClipEncoder,
    /// Final norm.
    pub final_layer_norm: LayerNorm,
}

/// `CLIPTextEmbeddings`.
#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    /// Token embedding.
    pub token_embedding: Embedding,
    /// Learned positions.
    pub position_embedding: Embedding,
}

/// `CLIPEncoder`.
#[derive(Module, Debug)]
pub struct ClipEncoder {
    /// `layers.N`.
    pub layers: Vec<ClipLayer>,
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP.
#[derive(Module, Debug)]
pub struct ClipLayer {
    /// Causal self-attention.
    pub self_attn: ClipAttention,
    /// Before attention.
    pub layer_norm1: LayerNorm,
    /// MLP.
    pub mlp: ClipMlp,
    /// Before the MLP.
    pub layer_norm2: LayerNorm,
}

/// Separate q/k/v/out projections.
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// Query.
    pub q_proj: Linear,
    /// Key.
    pub k_proj: Linear,
    /// Value.
    pub v_proj: Linear,
    /// Output.
    pub out_proj: Linear,
}

/// Two-layer MLP.
#[derive(Module, Debug)]
pub struct ClipMlp {
    /// Up.
    pub fc1: Linear,
    /// Down.
    pub fc2: Linear,
}

impl ClipTextModel {
    /// Encodes token ids `[b, n]` (n <= 77).
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> TextOutput {
        let m = &self.text_model;
        let act = activation(self.quick_gelu);
        let [_, n] = input_ids.dims();
        let eos = eos_positions(&input_ids);
        let positions = m.embeddings.position_embedding.weight.val().narrow(0, 0, n);
        let mut x = m.embeddings.token_embedding.forward(input_ids) + positions.unsqueeze_dim(0);
        let mut penultimate = x.clone();
        let last_index = m.encoder.layers.len().saturating_sub(1);
        for (i, layer) in m.encoder.layers.iter().enumerate() {
            if i == last_index {
                penultimate = x.clone();
            }
            let a = &layer.self_attn;
            let h = layer.layer_norm1.forward(x.clone());
            let h = multi_head_attention(
                a.q_proj.forward(h.clone()),
                a.k_proj.forward(h.clone()),
                a.v_proj.forward(h),
                self.heads,
                true,
            );
            x = x + a.out_proj.forward(h);
            let h = layer.layer_norm2.forward(x.clone());
            x = x + layer.mlp.fc2.forward(act.apply(layer.mlp.fc1.forward(h)));
        }
        let last = m.final_layer_norm.forward(x);
        let pooled = gather_rows(&last, &eos);
        TextOutput {
            last,
            penultimate,
            pooled,
        }
    }
}

/// open_clip's `TextTransformer` (SGM stores it under `conditioner.embedders.1.model.`).
#[derive(Module, Debug)]
pub struct OpenClipText {
    /// Token embedding.
    pub token_embedding: Embedding,
    /// Learned positions `[77, d]`.
    pub positional_embedding: Param<Tensor<2>>,
    /// The layers.
    pub transformer: OpenClipTransformer,
    /// Final norm.
    pub ln_final: LayerNorm,
    /// Pooled projection `[d, proj]` (applied as `x @ text_projection`).
    pub text_projection: Param<Tensor<2>>,
    heads: usize,
    quick_gelu: bool,
}

/// `transformer`.
#[derive(Module, Debug)]
pub struct OpenClipTransformer {
    /// `resblocks.N`.
    pub resblocks: Vec<OpenClipBlock>,
}

/// `ResidualAttentionBlock`.
#[derive(Module, Debug)]
pub struct OpenClipBlock {
    /// Before attention.
    pub ln_1: LayerNorm,
    /// Fused-projection attention (`nn.MultiheadAttention`).
    pub attn: FusedAttention,
    /// Before the MLP.
    pub ln_2: LayerNorm,
    /// MLP.
    pub mlp: OpenClipMlp,
}

/// `nn.MultiheadAttention`: q, k and v projections stacked in one `[3d, d]` matrix.
#[derive(Module, Debug)]
pub struct FusedAttention {
    /// `[3d, d]` in PyTorch's `[out, in]` layout.
    pub in_proj_weight: Param<Tensor<2>>,
    /// `[3d]`.
    pub in_proj_bias: Param<Tensor<1>>,
    /// Output projection.
    pub out_proj: Linear,
}

/// `c_fc` then `c_proj`.
#[derive(Module, Debug)]
pub struct OpenClipMlp {
    /// Up.
    pub c_fc: Linear,
    /// Down.
    pub c_proj: Linear,
}

impl OpenClipText {
    /// Encodes token ids `[b, n]` (n <= 77).
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> TextOutput {
        let act = activation(self.quick_gelu);
        let [_, n] = input_ids.dims();
        let eos = eos_positions(&input_ids);
        let positions = self.positional_embedding.val().narrow(0, 0, n);
        let mut x = self.token_embedding.forward(input_ids) + positions.unsqueeze_dim(0);
        let mut penultimate = x.clone();
        let last_index = self.transformer.resblocks.len().saturating_sub(1);
        for (i, block) in self.transformer.resblocks.iter().enumerate() {
            if i == last_index {
                penultimate = x.clone();
            }
            let h = block.ln_1.forward(x.clone());
            let qkv = burn::tensor::module::linear(
                h,
                block.attn.in_proj_weight.val().transpose(),
                Some(block.attn.in_proj_bias.val()),
            );
            let mut parts = qkv.chunk(3, 2);
            let v = parts.pop().expect("chunk(3) yields three parts");
            let k = parts.pop().expect("chunk(3) yields three parts");
            let q = parts.pop().expect("chunk(3) yields three parts");
            let h = multi_head_attention(q, k, v, self.heads, true);
            x = x + block.attn.out_proj.forward(h);
            let h = block.ln_2.forward(x.clone());
            x = x + block
                .mlp
                .c_proj
                .forward(act.apply(block.mlp.c_fc.forward(h)));
        }
        let last = self.ln_final.forward(x);
        let pooled = gather_rows(&last, &eos).matmul(self.text_projection.val());
        TextOutput {
            last,
            penultimate,
            pooled,
        }
    }
}

fn activation(quick_gelu: bool) -> Activation {
    if quick_gelu {
        Activation::QuickGelu
    } else {
        Activation::Gelu
    }
}

/// Position of the end-of-text token in each row: the highest id, as both references take it.
fn eos_positions(input_ids: &Tensor<2, Int>) -> Vec<usize> {
    let [b, n] = input_ids.dims();
    let ids: Vec<i64> = input_ids
        .clone()
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap_or_default();
    (0..b)
        .map(|row| {
            let slice = &ids[row * n..(row + 1) * n];
            let mut best = 0;
            for (i, &id) in slice.iter().enumerate() {
                if id > slice[best] {
                    best = i;
                }
            }
            best
        })
        .collect()
}

/// `x[row, positions[row], :]` for each row.
fn gather_rows(x: &Tensor<3>, positions: &[usize]) -> Tensor<2> {
    let [_, _, d] = x.dims();
    let rows: Vec<Tensor<2>> = positions
        .iter()
        .enumerate()
        .map(|(row, &p)| x.clone().narrow(0, row, 1).narrow(1, p, 1).reshape([1, d]))
        .collect();
    Tensor::cat(rows, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::param_keys;

    /// (layout, config, parameters of the reference model, tensors).
    #[test]
    fn presets_have_the_reference_sizes() {
        let device = Device::flex();
        let count = |keys: &[(crate::weights::KeyOf, Vec<usize>)]| -> usize {
            keys.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
        };
        let l = param_keys(&TextConfig::clip_l().init_hf(&device));
        assert_eq!(count(&l), 123_060_480);
        assert_eq!(l.len(), 196);
        assert!(
            l.iter()
                .any(|(k, _)| k.key == "text_model.encoder.layers.11.mlp.fc2.bias")
        );
        let g = param_keys(&TextConfig::clip_g().init_open_clip(&device));
        assert_eq!(count(&g), 694_659_840);
        assert!(
            g.iter()
                .any(|(k, _)| k.key == "transformer.resblocks.31.attn.in_proj_weight")
        );
        assert!(g.iter().any(|(k, _)| k.key == "text_projection"));
    }
}

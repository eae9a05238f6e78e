//! Forward passes chosen by the names of the tensors given, for parity checks against any
//! reference (`slider-run model forward`). Input names follow diffusers' argument names; the
//! table of names is in `docs/models.md`.
//!
//! | inputs | part | outputs |
//! |---|---|---|
//! | `sample`, `timestep`, `encoder_hidden_states` (+ `text_embeds`, `time_ids` for SDXL) | UNet | `noise_pred` |
//! | `input_ids` | CLIP-L | `clip_l.last_hidden_state`, `clip_l.penultimate`, `clip_l.pooled` |
//! | `input_ids_2` (SDXL) | bigG | `clip_g.last_hidden_state`, `clip_g.penultimate`, `clip_g.text_embeds` |
//! | `input_ids` (+ `input_ids_2` for SDXL) | conditioning | `cond.encoder_hidden_states` (+ `cond.text_embeds`) |
//! | `image` | VAE encoder | `latent_mean`, `latent_logvar` |
//! | `latents` | VAE decoder | `decoded` |

use std::collections::BTreeMap;

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::checkpoint::{Family, StableDiffusion};

/// A tensor on the host: shape and f32 values (token ids are exact in f32).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// Why a named forward pass cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    /// No input name the models understand.
    #[error("none of the inputs ({given}) names a model input; see docs/models.md")]
    NothingToRun {
        /// The names given.
        given: String,
    },
    /// A group of inputs is incomplete.
    #[error("`{have}` given without `{missing}`")]
    Incomplete {
        /// The name that was given.
        have: &'static str,
        /// The name that is missing.
        missing: &'static str,
    },
    /// The checkpoint lacks the part an input calls for.
    #[error("`{input}` needs the {part}, which this checkpoint does not contain")]
    MissingPart {
        /// The input.
        input: &'static str,
        /// The part.
        part: &'static str,
    },
    /// An input has the wrong rank or size.
    #[error("`{name}` has shape {shape:?}; expected {expected}")]
    Shape {
        /// The input.
        name: &'static str,
        /// Its shape.
        shape: Vec<usize>,
        /// What was expected.
        expected: &'static str,
    },
    /// A token id the text encoder has no embedding for.
    #[error("`{name}` holds {value}, not a token id of a text encoder with {vocab} tokens")]
    TokenId {
        /// The input.
        name: &'static str,
        /// The value found, as written (`NaN`, `2.5`, `49408`).
        value: String,
        /// The encoder's token embeddings.
        vocab: usize,
    },
}

fn tensor<const D: usize>(
    inputs: &BTreeMap<String, HostTensor>,
    name: &'static str,
    expected: &'static str,
    device: &Device,
) -> Result<Option<Tensor<D>>, ForwardError> {
    let Some(t) = inputs.get(name) else {
        return Ok(None);
    };
    if t.shape.len() != D || t.shape.iter().product::<usize>() != t.values.len() {
        return Err(ForwardError::Shape {
            name,
            shape: t.shape.clone(),
            expected,
        });
    }
    Ok(Some(Tensor::from_data(
        TensorData::new(t.values.clone(), t.shape.clone()),
        device,
    )))
}

/// Token ids `[batch, <=77]`, each a whole number below `vocab` (the encoder's token
/// embeddings, when the checkpoint has that encoder).
fn ids(
    inputs: &BTreeMap<String, HostTensor>,
    name: &'static str,
    vocab: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor<2, Int>>, ForwardError> {
    let Some(t) = inputs.get(name) else {
        return Ok(None);
    };
    let shape = match t.shape.as_slice() {
        [n] => vec![1, *n],
        [b, n] if *n <= 77 => vec![*b, *n],
        _ => {
            return Err(ForwardError::Shape {
                name,
                shape: t.shape.clone(),
                expected: "[batch, <=77] token ids",
            });
        }
    };
    if let Some(vocab) = vocab
        && let Some(&value) = t
            .values
            .iter()
            .find(|&&v| !(v >= 0.0 && v.fract() == 0.0 && (v as usize) < vocab))
    {
        return Err(ForwardError::TokenId {
            name,
            value: value.to_string(),
            vocab,
        });
    }
    let values: Vec<i64> = t.values.iter().map(|&v| v as i64).collect();
    Ok(Some(Tensor::from_data(
        TensorData::new(values, shape),
        device,
    )))
}

fn host<const D: usize>(t: Tensor<D>) -> HostTensor {
    let data = t.into_data();
    HostTensor {
        shape: data.shape().to_vec(),
        values: data
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default(),
    }
}

impl StableDiffusion {
    /// Runs every part the input names call for; see the module table.
    pub fn forward_named(
        &self,
        inputs: &BTreeMap<String, HostTensor>,
        device: &Device,
    ) -> Result<BTreeMap<String, HostTensor>, ForwardError> {
        let mut out = BTreeMap::new();
        let mut ran = false;

        let vocab = |t: &Option<crate::clip::TextConfig>| t.as_ref().map(|t| t.vocab_size);
        let ids_l = ids(inputs, "input_ids", vocab(&self.spec.text_l), device)?;
        let ids_g = ids(inputs, "input_ids_2", vocab(&self.spec.text_g), device)?;
        let mut cond_l = None;
        let mut cond_g = None;
        if let Some(ids_l) = ids_l {
            let model = self.text_l.as_ref().ok_or(ForwardError::MissingPart {
                input: "input_ids",
                part: "CLIP-L text encoder",
            })?;
            let o = model.forward(ids_l);
            out.insert("clip_l.last_hidden_state".into(), host(o.last.clone()));
            out.insert("clip_l.penultimate".into(), host(o.penultimate.clone()));
            out.insert("clip_l.pooled".into(), host(o.pooled.clone()));
            cond_l = Some(o);
            ran = true;
        }
        if let Some(ids_g) = ids_g {
            let model = self.text_g.as_ref().ok_or(ForwardError::MissingPart {
                input: "input_ids_2",
                part: "OpenCLIP bigG text encoder",
            })?;
            let o = model.forward(ids_g);
            out.insert("clip_g.last_hidden_state".into(), host(o.last.clone()));
            out.insert("clip_g.penultimate".into(), host(o.penultimate.clone()));
            out.insert("clip_g.text_embeds".into(), host(o.pooled.clone()));
            cond_g = Some(o);
            ran = true;
        }
        match (self.spec.family, cond_l, cond_g) {
            (Family::Sd1, Some(l), _) => {
                out.insert("cond.encoder_hidden_states".into(), host(l.last));
            }
            (Family::Sdxl, Some(l), Some(g)) => {
                let context = Tensor::cat(vec![l.penultimate, g.penultimate], 2);
                out.insert("cond.encoder_hidden_states".into(), host(context));
                out.insert("cond.text_embeds".into(), host(g.pooled));
            }
            _ => {}
        }

        let sample = tensor::<4>(inputs, "sample", "[batch, 4, h, w]", device)?;
        if let Some(sample) = sample {
            let batch = sample.dims()[0];
            let timestep = inputs.get("timestep").ok_or(ForwardError::Incomplete {
                have: "sample",
                missing: "timestep",
            })?;
            let t = match timestep.values.as_slice() {
                [t] => vec![*t; batch],
                v if v.len() == batch => v.to_vec(),
                _ => {
                    return Err(ForwardError::Shape {
                        name: "timestep",
                        shape: timestep.shape.clone(),
                        expected: "one value or one per batch item",
                    });
                }
            };
            let t = Tensor::<1>::from_data(TensorData::new(t, [batch]), device);
            let context = tensor::<3>(
                inputs,
                "encoder_hidden_states",
                "[batch, tokens, context_dim]",
                device,
            )?
            .ok_or(ForwardError::Incomplete {
                have: "sample",
                missing: "encoder_hidden_states",
            })?;
            let y = if self.unet.takes_added_conditioning() {
                let text = tensor::<2>(inputs, "text_embeds", "[batch, pooled_dim]", device)?
                    .ok_or(ForwardError::Incomplete {
                        have: "sample",
                        missing: "text_embeds",
                    })?;
                let ids = tensor::<2>(inputs, "time_ids", "[batch, 6]", device)?.ok_or(
                    ForwardError::Incomplete {
                        have: "sample",
                        missing: "time_ids",
                    },
                )?;
                Some(self.unet.added_conditioning(text, ids))
            } else {
                None
            };
            out.insert(
                "noise_pred".into(),
                host(self.unet.forward(sample, t, context, y)),
            );
            ran = true;
        }

        if let Some(image) = tensor::<4>(inputs, "image", "[batch, 3, h, w]", device)? {
            let vae = self.vae.as_ref().ok_or(ForwardError::MissingPart {
                input: "image",
                part: "VAE",
            })?;
            let (mean, logvar) = vae.encode(image);
            out.insert("latent_mean".into(), host(mean));
            out.insert("latent_logvar".into(), host(logvar));
            ran = true;
        }
        if let Some(latents) = tensor::<4>(inputs, "latents", "[batch, 4, h, w]", device)? {
            let vae = self.vae.as_ref().ok_or(ForwardError::MissingPart {
                input: "latents",
                part: "VAE",
            })?;
            out.insert("decoded".into(), host(vae.decode(latents)));
            ran = true;
        }

        if !ran {
            return Err(ForwardError::NothingToRun {
                given: inputs.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
        Ok(out)
    }
}

/// Reads every tensor of a safetensors file as f32 (f32, f16, bf16, f64 or integer ids).
pub fn read_tensors(
    path: &std::path::Path,
) -> Result<BTreeMap<String, HostTensor>, crate::CheckpointError> {
    let ckpt = crate::Checkpoint::open(path)?;
    let mut out = BTreeMap::new();
    for key in ckpt.keys() {
        use crate::weights::TensorSource;
        let values = ckpt
            .values_f32(key)
            .map_err(|message| crate::CheckpointError::Format {
                path: path.to_path_buf(),
                message: format!("tensor `{key}`: {message}"),
            })?;
        let shape = ckpt.shape_of(key).unwrap_or_default();
        out.insert(key.to_string(), HostTensor { shape, values });
    }
    Ok(out)
}

/// Writes tensors by name as f32 safetensors, atomically.
pub fn write_tensors(
    path: &std::path::Path,
    mut tensors: BTreeMap<String, HostTensor>,
) -> Result<(), crate::CheckpointError> {
    let entries: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect();
    crate::checkpoint::write_safetensors(
        path,
        &entries,
        crate::StoreDtype::F32,
        &BTreeMap::new(),
        |key| tensors.remove(key).map(|t| t.values).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(values: Vec<f32>) -> BTreeMap<String, HostTensor> {
        let n = values.len();
        BTreeMap::from([(
            "input_ids".to_string(),
            HostTensor {
                shape: vec![1, n],
                values,
            },
        )])
    }

    #[test]
    fn token_ids_are_whole_numbers_below_the_vocabulary() {
        let device = Device::flex();
        let ok = ids(
            &input(vec![49406.0, 320.0, 49407.0]),
            "input_ids",
            Some(49408),
            &device,
        );
        assert!(matches!(ok, Ok(Some(_))));
        for bad in [49408.0, -1.0, 2.5, f32::NAN] {
            let got = ids(&input(vec![0.0, bad]), "input_ids", Some(49408), &device);
            assert!(
                matches!(got, Err(ForwardError::TokenId { vocab: 49408, .. })),
                "{bad}: {got:?}"
            );
        }
    }
}

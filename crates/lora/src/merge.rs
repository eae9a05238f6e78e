//! The exact merge: the result's delta is `sum_i ratio_i * delta_i`, by concatenating ranks
//! with each input's `ratio * alpha / rank` folded into its up factor (unlike kohya's
//! `merge_lora.py` without `--concat`, which adds factors and so does not add deltas).

use rayon::prelude::*;

use crate::Lora;
use crate::combine;
use crate::error::LoraError;
use crate::module::{AlphaStorage, Module, TensorDtype};

/// Merges LoRAs exactly; each module's rank is the sum of its inputs' ranks, alpha = rank.
///
/// Inputs of one FLUX.1 / SD3.5 model in different layouts (kohya, diffusers, ComfyUI) are
/// converted exactly to the first one's layout before merging; the result is in that layout.
pub fn merge(models: &[&Lora], ratios: &[f64]) -> Result<Lora, LoraError> {
    let converted = combine::same_naming(models)?;
    let models: Vec<&Lora> = converted.iter().map(|c| c.as_ref()).collect();
    let models = models.as_slice();
    let grouped = combine::group_modules(models, ratios)?;
    let modules: Vec<(String, Module)> = grouped
        .par_iter()
        .map(|(name, contribs)| {
            let first = contribs[0].module;
            let (out, in_flat) = (first.out_dim, first.in_flat());
            let rank: usize = contribs.iter().map(|c| c.module.rank).sum();
            let mut up = vec![0f32; out * rank];
            let mut down = Vec::with_capacity(rank * in_flat);
            let mut col = 0;
            for c in contribs {
                let m = c.module;
                let s = c.ratio * f64::from(m.scale());
                for i in 0..out {
                    for j in 0..m.rank {
                        up[i * rank + col + j] = (f64::from(m.up[i * m.rank + j]) * s) as f32;
                    }
                }
                down.extend_from_slice(&m.down);
                col += m.rank;
            }
            let module = Module {
                kind: first.kind,
                out_dim: out,
                in_dim: first.in_dim,
                rank,
                up,
                down,
                alpha: rank as f32,
                alpha_storage: AlphaStorage::Float,
                dtype: TensorDtype::F32,
            };
            (name.clone(), module)
        })
        .collect();
    let mut ranks: Vec<usize> = modules.iter().map(|(_, m)| m.rank).collect();
    ranks.sort_unstable();
    ranks.dedup();
    let dim = match ranks.as_slice() {
        [r] => r.to_string(),
        _ => "Dynamic".to_string(),
    };
    Ok(Lora {
        modules: modules.into_iter().collect(),
        metadata: combine::minimal_metadata(models, &dim, &dim, None),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::dense_delta;
    use crate::synth::{self, Layout};

    #[test]
    fn merged_delta_is_the_weighted_sum_of_deltas() {
        let a = synth::random_lora(Layout::Tiny, 4, 1.0, 1);
        let mut b = synth::random_lora(Layout::Tiny, 2, 8.0, 2);
        let only_a = b.modules.keys().next().cloned().expect("modules");
        b.modules.remove(&only_a);
        let merged = merge(&[&a, &b], &[1.5, -0.5]).expect("merges");
        for (name, m) in &merged.modules {
            let mut want = dense_delta(&a.modules[name]) * faer::Scale(1.5);
            if let Some(mb) = b.modules.get(name) {
                want += dense_delta(mb) * faer::Scale(-0.5);
                assert_eq!(m.rank, 6);
            } else {
                assert_eq!(m.rank, 4);
            }
            let err = (&dense_delta(m) - &want).norm_l2() / want.norm_l2();
            assert!(err < 1e-6, "{name}: {err}");
        }
        assert_eq!(merged.metadata["ss_network_dim"], "Dynamic");
    }
}

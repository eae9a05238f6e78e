//! A serialisable summary of a LoRA: layout, module count, ranks, alphas, dtypes, metadata
//! and the Frobenius norm of every module's delta (`slider-run inspect`).

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use crate::Lora;
use crate::module::ModuleKind;

/// Everything `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub layout: String,
    /// The naming of the modules: `kohya`, `diffusers` or `comfyui` (`None` if unknown).
    pub naming: Option<String>,
    pub text_encoders: Vec<String>,
    pub module_count: usize,
    /// Count of modules per kind (`linear`, `conv1x1`, `conv3x3`).
    pub kinds: BTreeMap<String, usize>,
    /// Count of modules per rank.
    pub ranks: BTreeMap<usize, usize>,
    /// Count of modules per alpha (formatted).
    pub alphas: BTreeMap<String, usize>,
    /// Count of modules per stored dtype.
    pub dtypes: BTreeMap<String, usize>,
    pub metadata: BTreeMap<String, String>,
    pub modules: Vec<ModuleSummary>,
}

/// One module's line of the summary.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleSummary {
    pub name: String,
    pub kind: String,
    pub out_dim: usize,
    pub in_dim: usize,
    /// `[kh, kw]` for convs.
    pub kernel: Option<[usize; 2]>,
    pub rank: usize,
    pub alpha: f32,
    pub dtype: String,
    /// `||alpha / rank * up @ down||_F`.
    pub delta_norm: f64,
}

/// Summarises a LoRA (module norms computed in parallel, exactly, from the factors).
pub fn summarize(lora: &Lora) -> Summary {
    let report = lora.layout();
    let modules: Vec<ModuleSummary> = lora
        .modules
        .par_iter()
        .map(|(name, m)| ModuleSummary {
            name: name.clone(),
            kind: m.kind.to_string(),
            out_dim: m.out_dim,
            in_dim: m.in_dim,
            kernel: match m.kind {
                ModuleKind::Linear => None,
                ModuleKind::Conv { kh, kw } => Some([kh, kw]),
            },
            rank: m.rank,
            alpha: m.alpha,
            dtype: m.dtype.to_string(),
            delta_norm: m.delta_norm(),
        })
        .collect();
    let mut kinds = BTreeMap::new();
    let mut ranks = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    let mut dtypes = BTreeMap::new();
    for m in &modules {
        *kinds.entry(m.kind.clone()).or_insert(0) += 1;
        *ranks.entry(m.rank).or_insert(0) += 1;
        *alphas.entry(format!("{}", m.alpha)).or_insert(0) += 1;
        *dtypes.entry(m.dtype.clone()).or_insert(0) += 1;
    }
    let layout = match report.unet {
        None => "no UNet modules".to_string(),
        Some(crate::UnetLayout::Unknown) => "unknown".to_string(),
        Some(crate::UnetLayout::Known(l)) => l.label().to_string(),
    };
    Summary {
        layout,
        naming: report.naming.map(|n| n.label().to_string()),
        text_encoders: report.text_encoders,
        module_count: modules.len(),
        kinds,
        ranks,
        alphas,
        dtypes,
        metadata: lora.metadata.clone(),
        modules,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{self, Layout};

    #[test]
    fn summary_counts_and_norms() {
        let lora = synth::random_lora(Layout::Tiny, 4, 1.0, 1);
        let s = summarize(&lora);
        assert_eq!(s.layout, "tiny test UNet");
        assert_eq!(s.module_count, 38);
        assert_eq!(s.kinds["linear"], 30);
        assert_eq!(s.kinds["conv1x1"], 6);
        assert_eq!(s.kinds["conv3x3"], 2);
        assert_eq!(s.ranks[&4], 38);
        assert_eq!(s.alphas["1"], 38);
        for m in &s.modules {
            let dense = crate::dense::dense_delta(&lora.modules[&m.name]).norm_l2();
            assert!(
                (m.delta_norm - dense).abs() < 1e-9 * dense.max(1.0),
                "{}",
                m.name
            );
        }
    }
}

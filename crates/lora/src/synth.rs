//! Seeded synthetic LoRAs of real layouts, for tests, benchmarks and demo assets. Factors
//! follow the scale of trained LoRAs: `down` kaiming-uniform (bound `1/sqrt(fan_in)`, kohya's
//! init), `up` uniform in `[-0.05, 0.05]` (a trained up is no longer zero).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::Lora;
pub use crate::layout::Layout;
use crate::layout::ModuleSpec;
use crate::module::{AlphaStorage, Module, TensorDtype};
use crate::transformer::Naming;

/// Half-width of the uniform distribution of `up` entries.
const UP_BOUND: f32 = 0.05;

/// A LoRA with every module of `layout` at `rank` and `alpha`; same seed, same LoRA.
pub fn random_lora(layout: Layout, rank: usize, alpha: f32, seed: u64) -> Lora {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let modules = layout
        .modules()
        .into_iter()
        .map(|spec| {
            let m = random_module(&spec, rank, alpha, &mut rng);
            (spec.name, m)
        })
        .collect();
    Lora {
        modules,
        metadata: training_metadata(layout, rank, alpha),
    }
}

/// A LoRA with every `every`-th module (sorted by name) of `layout` in `naming`, at `rank`
/// and alpha 1: real shapes at a fraction of the size, for tests and the samples of the
/// transformer benchmarks.
pub fn sampled_lora(layout: Layout, naming: Naming, every: usize, rank: usize, seed: u64) -> Lora {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let modules = layout
        .modules_named(naming)
        .into_iter()
        .step_by(every.max(1))
        .map(|spec| {
            let mut m = random_module(&spec, rank, 1.0, &mut rng);
            if naming == Naming::Diffusers {
                // diffusers / ai-toolkit files carry no alpha (scale 1).
                m.alpha = rank as f32;
                m.alpha_storage = AlphaStorage::Absent;
            }
            (spec.name, m)
        })
        .collect();
    Lora {
        modules,
        metadata: training_metadata(layout, rank, 1.0),
    }
}

/// One module with kohya-like random factors.
pub fn random_module(spec: &ModuleSpec, rank: usize, alpha: f32, rng: &mut impl Rng) -> Module {
    let in_flat = spec.in_dim * spec.kind.window();
    let bound = 1.0 / (in_flat as f32).sqrt();
    let down = (0..rank * in_flat)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let up = (0..spec.out_dim * rank)
        .map(|_| rng.random_range(-UP_BOUND..UP_BOUND))
        .collect();
    Module {
        kind: spec.kind,
        out_dim: spec.out_dim,
        in_dim: spec.in_dim,
        rank,
        up,
        down,
        alpha,
        alpha_storage: AlphaStorage::Float,
        dtype: TensorDtype::F32,
    }
}

/// The `ss_*` keys a kohya training run writes that describe the network.
fn training_metadata(layout: Layout, rank: usize, alpha: f32) -> BTreeMap<String, String> {
    let mut md = BTreeMap::new();
    md.insert("ss_network_module".into(), "networks.lora".into());
    md.insert("ss_network_dim".into(), rank.to_string());
    md.insert(
        "ss_network_alpha".into(),
        crate::resize::python_float(f64::from(alpha)),
    );
    md.insert("ss_v2".into(), "False".into());
    md.insert("ss_network_train_unet_only".into(), "True".into());
    let base = match layout {
        Layout::Sd1 => Some("sd_v1"),
        Layout::Sdxl => Some("sdxl_base_v1-0"),
        Layout::Flux => Some("flux1"),
        Layout::Sd35Large | Layout::Sd35Medium => Some("sd3"),
        Layout::Tiny => None,
    };
    if let Some(base) = base {
        md.insert("ss_base_model_version".into(), base.into());
    }
    md
}

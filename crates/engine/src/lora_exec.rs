//! The LoRA kinds, run in-process on `slider-lora` (which parallelises over modules with
//! rayon): `svd_merge`, `merge`, `resize`. Each writes one file, `lora.safetensors`.

use std::path::Path;

use slider_lora::{DynamicMethod, Lora, RankRule, ResizeOptions, SvdMergeOptions};
use slider_recipe::{DynamicMethod as Method, Input, NodeParams, Precision, RankRule as Rule};

use crate::executor::{ExecError, Executor, Job, Produced};

/// File name of the single output of the LoRA kinds.
pub const LORA_FILE: &str = "lora.safetensors";

pub struct SvdMergeExecutor;
pub struct MergeExecutor;
pub struct ResizeExecutor;

fn precision(p: Precision) -> slider_lora::Precision {
    match p {
        Precision::Float => slider_lora::Precision::F32,
        Precision::Fp16 => slider_lora::Precision::F16,
        Precision::Bf16 => slider_lora::Precision::Bf16,
    }
}

fn lora_err(what: &str) -> impl FnOnce(slider_lora::LoraError) -> ExecError + '_ {
    move |e| ExecError::Failed(format!("{what}: {e}"))
}

fn load_all(job: &Job, models: &[Input]) -> Result<Vec<Lora>, ExecError> {
    models
        .iter()
        .map(|m| {
            let path = job.input_path(m)?;
            job.log.line(&format!("loading {}", path.display()));
            Lora::load(path).map_err(lora_err("loading an input LoRA"))
        })
        .collect()
}

fn save(job: &Job, lora: &Lora, p: Precision) -> Result<Vec<Produced>, ExecError> {
    let path = job.out_dir.join(LORA_FILE);
    lora.save(&path, precision(p))
        .map_err(lora_err("writing the result"))?;
    job.log.line(&format!(
        "wrote {} ({} modules, {:?})",
        path.display(),
        lora.modules.len(),
        p
    ));
    Ok(vec![Produced {
        name: "lora".into(),
        file: LORA_FILE.into(),
    }])
}

fn check_cancel(job: &Job) -> Result<(), ExecError> {
    if job.cancel.is_cancelled() {
        Err(ExecError::Cancelled)
    } else {
        Ok(())
    }
}

impl Executor for SvdMergeExecutor {
    fn kind(&self) -> &str {
        "svd_merge"
    }

    /// 2: the Gram-matrix route of `slider-lora` (the last bits of the factors moved,
    /// deltas within 1e-6 of the dense reference as before).
    fn code_version(&self) -> u32 {
        2
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        let NodeParams::SvdMerge(p) = job.params else {
            return Err(ExecError::Failed("not an svd_merge node".into()));
        };
        let models = load_all(job, &p.models)?;
        check_cancel(job)?;
        let refs: Vec<&Lora> = models.iter().collect();
        let opts = SvdMergeOptions {
            new_rank: p.new_rank,
            new_conv_rank: p.new_conv_rank,
            clamp_quantile: p.clamp_quantile,
        };
        // Computation is f32 whatever `precision` says; `save_precision` sets the file's.
        let merged =
            slider_lora::svd_merge(&refs, &p.ratios, &opts).map_err(lora_err("svd_merge"))?;
        check_cancel(job)?;
        save(job, &merged, p.save_precision)
    }
}

impl Executor for MergeExecutor {
    fn kind(&self) -> &str {
        "merge"
    }

    fn code_version(&self) -> u32 {
        1
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        let NodeParams::Merge(p) = job.params else {
            return Err(ExecError::Failed("not a merge node".into()));
        };
        let models = load_all(job, &p.models)?;
        check_cancel(job)?;
        let refs: Vec<&Lora> = models.iter().collect();
        let merged = slider_lora::merge(&refs, &p.ratios).map_err(lora_err("merge"))?;
        check_cancel(job)?;
        save(job, &merged, p.save_precision)
    }
}

impl Executor for ResizeExecutor {
    fn kind(&self) -> &str {
        "resize"
    }

    /// 2: the Gram-matrix route of `slider-lora` (the last bits of the factors moved,
    /// deltas within 1e-6 of the dense reference as before).
    fn code_version(&self) -> u32 {
        2
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        let NodeParams::Resize(p) = job.params else {
            return Err(ExecError::Failed("not a resize node".into()));
        };
        let model = load_all(job, std::slice::from_ref(&p.model))?.remove(0);
        check_cancel(job)?;
        let dynamic = match (p.dynamic_method, p.dynamic_param) {
            (None, _) => None,
            (Some(m), Some(x)) => Some(match m {
                Method::SvRatio => DynamicMethod::SvRatio(x),
                Method::SvFro => DynamicMethod::SvFro(x),
                Method::SvCumulative => DynamicMethod::SvCumulative(x),
            }),
            (Some(m), None) => {
                return Err(ExecError::Failed(format!(
                    "dynamic_method {m:?} needs dynamic_param"
                )));
            }
        };
        let opts = ResizeOptions {
            new_rank: p.new_rank,
            new_conv_rank: p.new_conv_rank,
            dynamic,
        };
        let rule = match p.rank_rule {
            Rule::OnePastThreshold => RankRule::OnePastThreshold,
            Rule::ReachThreshold => RankRule::ReachThreshold,
        };
        let (resized, stats) =
            slider_lora::resize_by_rule(&model, &opts, rule).map_err(lora_err("resize"))?;
        for s in &stats {
            job.log.line(&format!(
                "{}: rank {} alpha {} sum(S) retained {:.4} fro retained {:.4} max ratio {:.3}",
                s.name, s.new_rank, s.new_alpha, s.sum_retained, s.fro_retained, s.max_ratio
            ));
        }
        check_cancel(job)?;
        save(job, &resized, p.save_precision)
    }
}

/// The relative Frobenius error between the deltas of two LoRA files (`verify --tolerance`).
pub fn lora_delta_error(a: &Path, b: &Path) -> Result<f64, String> {
    let la = Lora::load(a).map_err(|e| e.to_string())?;
    let lb = Lora::load(b).map_err(|e| e.to_string())?;
    slider_lora::delta_relative_error(&la, &lb).map_err(|e| e.to_string())
}

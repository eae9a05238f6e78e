//! `merge_into_model`, run in-process on `slider-bake`: LoRAs baked into a checkpoint,
//! streamed tensor by tensor into `model.safetensors`.

use slider_bake::{BakeOptions, LoraInput};
use slider_lora::Lora;
use slider_recipe::{NodeParams, Precision};

use crate::executor::{ExecError, Executor, Job, Produced};

/// File name of the output of `merge_into_model`.
pub const MODEL_FILE: &str = "model.safetensors";

pub struct MergeIntoModelExecutor;

impl Executor for MergeIntoModelExecutor {
    fn kind(&self) -> &str {
        "merge_into_model"
    }

    fn code_version(&self) -> u32 {
        1
    }

    fn execute(&self, job: &Job) -> Result<Vec<Produced>, ExecError> {
        let NodeParams::MergeIntoModel(p) = job.params else {
            return Err(ExecError::Failed("not a merge_into_model node".into()));
        };
        if p.models.len() != p.ratios.len() {
            return Err(ExecError::Failed(format!(
                "{} models but {} ratios",
                p.models.len(),
                p.ratios.len()
            )));
        }
        let base = job.input_path(&p.base)?;
        let mut loaded = Vec::with_capacity(p.models.len());
        for m in &p.models {
            let path = job.input_path(m)?;
            job.log.line(&format!("loading {}", path.display()));
            let lora = Lora::load(path)
                .map_err(|e| ExecError::Failed(format!("loading an input LoRA: {e}")))?;
            loaded.push((path, lora));
        }
        let inputs: Vec<LoraInput<'_>> = loaded
            .iter()
            .zip(&p.ratios)
            .map(|((label, lora), &ratio)| LoraInput { label, lora, ratio })
            .collect();
        let opts = BakeOptions {
            save_precision: p.save_precision.map(|s| match s {
                Precision::Float => slider_lora::Precision::F32,
                Precision::Fp16 => slider_lora::Precision::F16,
                Precision::Bf16 => slider_lora::Precision::Bf16,
            }),
        };
        let out = job.out_dir.join(MODEL_FILE);
        job.log.line(&format!("baking into {}", base.display()));
        let report = slider_bake::bake(base, &inputs, &out, &opts, &|| job.cancel.is_cancelled())
            .map_err(|e| ExecError::Failed(format!("merge_into_model: {e}")))?
            .ok_or(ExecError::Cancelled)?;
        job.log.line(&format!(
            "wrote {}: {} LoRA modules into {} of {} tensors, {} bytes",
            out.display(),
            report.modules,
            report.adapted_tensors,
            report.tensors,
            report.bytes
        ));
        Ok(vec![Produced {
            name: "model".into(),
            file: MODEL_FILE.into(),
        }])
    }
}

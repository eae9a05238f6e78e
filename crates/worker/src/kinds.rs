//! The node kinds this worker runs, with their code versions, and the dispatch of one request.
//!
//! A kind's code version enters the key of every node of that kind: bump it when the same
//! parameters and inputs would give different output bytes, so stores rebuild exactly those
//! nodes. The golden-bytes tests below fail on any output change made without a bump.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use slider_evaluate::{self as evaluate, EvaluateConfig};
use slider_protocol::params::{Input, NodeParams};
use slider_protocol::{Progress, Request, WorkerOutput};
use slider_trainer::{TrainConfig, train};

use crate::xy_plot::{self, XyPlotConfig};

/// One kind the worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    /// The recipe's name of the kind.
    pub name: &'static str,
    /// Enters every key of the kind (see the module documentation).
    pub code_version: u32,
}

/// Every kind this worker runs.
pub const KINDS: &[Kind] = &[
    // 2: the LoRA branch beside frozen modules, LoCon (`conv_dim`) accepted.
    // 3: attention's backward recomputed in tiles (`slider_models::attention`): the same
    //    gradients up to rounding, other bytes.
    // 4: the matrix kernel's AVX-512 variant where the CPU has it (gemm's `x86-v4`): other
    //    rounding on such CPUs.
    // 5: attention on the CPU is `slider-attention`'s fused kernels, forward and backward:
    //    the same values up to rounding, other bytes.
    Kind {
        name: "train",
        code_version: 5,
    },
    // 2: the AVX-512 matrix kernel, as train's 4.
    // 3: the fused CPU attention, as train's 5 (the golden images kept their bytes; see the
    //    golden test).
    Kind {
        name: "xy_plot",
        code_version: 3,
    },
    // 2: the AVX-512 matrix kernel, as train's 4.
    // 3: the fused CPU attention, as xy_plot's 3.
    Kind {
        name: "evaluate",
        code_version: 3,
    },
];

/// Runs one request on `device` (`cpu`, `wgpu:0`, ...): decodes its parameters, resolves its
/// inputs to the files the engine sent, and returns the output files, the primary one first.
/// Setting `stop` ends a training run at the next step with a checkpoint in the work dir.
pub fn execute(
    req: &Request,
    device: &str,
    progress: &mut dyn FnMut(Progress),
    stop: &AtomicBool,
) -> Result<Vec<WorkerOutput>, String> {
    let resolve = |input: &Input| req.path_of(input).map(Path::to_path_buf);
    let text = |e: &dyn std::fmt::Display| e.to_string();
    let dev = slider_models::open_device(device).map_err(|e| text(&e))?;
    match &req.params {
        NodeParams::Train(params) if !params.trainer.is_default() => Err(format!(
            "node `{}` is trained by `{}`, which the engine runs, not the worker",
            req.node, params.trainer
        )),
        NodeParams::Train(params) => {
            let config = TrainConfig::from_params(params, resolve).map_err(|e| text(&e))?;
            train(
                &config,
                &req.work_dir,
                &req.output_dir,
                &dev,
                |p| {
                    progress(Progress {
                        step: Some(p.step as u64),
                        total: Some(p.total as u64),
                        loss: Some(f64::from(p.loss)),
                        message: None,
                    })
                },
                stop,
            )
            .map_err(|e| text(&e))?;
            Ok(WorkerOutput::list(&[
                ("lora", "lora.safetensors"),
                ("loss", "loss.csv"),
            ]))
        }
        NodeParams::XyPlot(params) => {
            let config = XyPlotConfig::from_params(params, resolve).map_err(|e| text(&e))?;
            xy_plot::run(&config, &req.output_dir, &dev, |p| {
                progress(Progress {
                    step: Some(p.cell as u64),
                    total: Some(p.cells as u64),
                    loss: None,
                    message: Some(format!("cell {}/{}: {}", p.cell, p.cells, p.label)),
                })
            })
            .map_err(|e| text(&e))?;
            Ok(WorkerOutput::list(&[("grid", xy_plot::GRID_FILE)]))
        }
        NodeParams::Evaluate(params) => {
            let config = EvaluateConfig::from_params(params, resolve).map_err(|e| text(&e))?;
            evaluate::run(&config, &req.output_dir, &dev, |p| {
                progress(Progress {
                    step: Some(p.done as u64),
                    total: Some(p.total as u64),
                    loss: None,
                    message: Some(format!("sample {}/{}: {}", p.done, p.total, p.label)),
                })
            })
            .map_err(|e| text(&e))?;
            Ok(WorkerOutput::list(&[
                ("quality", evaluate::QUALITY_JSON),
                ("table", evaluate::QUALITY_MD),
                ("grid", evaluate::GRID_FILE),
            ]))
        }
        other => Err(format!(
            "`{}` runs in the engine, not in the worker",
            other.kind()
        )),
    }
}

/// The kinds with their code versions, as the worker's hello says them.
pub fn versions() -> Vec<(String, u32)> {
    KINDS
        .iter()
        .map(|k| (k.name.to_owned(), k.code_version))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use slider_models::checkpoint::{ModelSpec, StoreDtype, write_random_checkpoint};
    use slider_protocol::RequestInput;
    use slider_protocol::names::{LrScheduler, MixedPrecision, Optimizer, Sampler};
    use slider_protocol::params::{
        Axis, EvaluateParams, MergeParams, Precision, TrainParams, XyPlotParams,
    };

    use super::*;

    /// A tiny world on disk: a random base, two images, the shipped eye meter.
    struct World {
        dir: tempfile::TempDir,
    }

    impl World {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("base.safetensors");
            write_random_checkpoint(&base, &ModelSpec::small_test(), StoreDtype::F32, 5).unwrap();
            for (name, shift) in [("a.png", 0u32), ("b.png", 40)] {
                image::RgbImage::from_fn(32, 32, |x, y| {
                    image::Rgb([(x * 7 + shift) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
                })
                .save(dir.path().join(name))
                .unwrap();
            }
            World { dir }
        }

        fn file(&self, name: &str) -> Input {
            Input::File(self.dir.path().join(name))
        }

        fn meter() -> Input {
            Input::File(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../../assets/eye-meter/eye-meter.safetensors"),
            )
        }

        /// Runs `params` as the engine would send them (file inputs resolve to themselves,
        /// a node to its `lora.safetensors`) and returns each output's BLAKE3.
        fn run(&self, node: &str, params: NodeParams) -> Vec<(String, String)> {
            let inputs = params
                .inputs()
                .into_iter()
                .map(|input| RequestInput {
                    input: input.clone(),
                    path: match input {
                        Input::File(path) => path.clone(),
                        Input::Node(name) => self.dir.path().join(name).join("lora.safetensors"),
                    },
                })
                .collect();
            let req = Request {
                node: node.into(),
                key: "k".into(),
                kind: params.kind().into(),
                params,
                inputs,
                work_dir: self.dir.path().join(format!("{node}.work")),
                output_dir: self.dir.path().join(node),
            };
            std::fs::create_dir_all(&req.work_dir).unwrap();
            std::fs::create_dir_all(&req.output_dir).unwrap();
            let outputs = execute(&req, "cpu", &mut |_| {}, &AtomicBool::new(false)).unwrap();
            outputs
                .iter()
                .map(|o| {
                    let bytes = std::fs::read(req.output_dir.join(&o.file)).unwrap();
                    (o.file.clone(), blake3::hash(&bytes).to_hex().to_string())
                })
                .collect()
        }
    }

    fn train_params(world: &World, optimizer: Optimizer, schedule: LrScheduler) -> TrainParams {
        TrainParams {
            base: world.file("base.safetensors"),
            base_config: None,
            images: vec![world.file("a.png"), world.file("b.png")],
            caption: "a face with big eyes".into(),
            learning_rate: 1e-3,
            unet_lr: None,
            train_batch_size: 1,
            max_train_steps: 2,
            network_dim: 2,
            network_alpha: 1.0,
            conv_dim: None,
            conv_alpha: None,
            network_train_unet_only: true,
            lr_scheduler: schedule,
            lr_warmup_steps: 0,
            optimizer_type: optimizer,
            optimizer_args: BTreeMap::new(),
            seed: 3,
            resolution: 32,
            noise_offset: 0.0,
            min_snr_gamma: None,
            mixed_precision: MixedPrecision::No,
            no_half_vae: false,
            gradient_checkpointing: false,
            save_precision: Precision::Float,
            checkpoint_every: 0,
            training_comment: String::new(),
            trainer: Default::default(),
            sd_scripts: None,
        }
    }

    fn hashes(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(f, h)| ((*f).to_owned(), (*h).to_owned()))
            .collect()
    }

    /// Fixed tiny inputs give fixed output bytes on the CPU backend, kind by kind. A change
    /// here is an output change: bump the kind's code version in [`KINDS`] with it, so users'
    /// stores rebuild those nodes, then update the hashes.
    #[test]
    fn each_kind_gives_its_golden_bytes() {
        let world = World::new();
        let train = world.run(
            "lora",
            NodeParams::Train(train_params(&world, Optimizer::Came, LrScheduler::Constant)),
        );
        let plot = world.run(
            "plot",
            NodeParams::XyPlot(XyPlotParams {
                base: world.file("base.safetensors"),
                base_config: None,
                loras: vec![Input::Node("lora".into())],
                prompt: "a face".into(),
                negative_prompt: String::new(),
                x: Axis::Weight(vec![-1.0, 1.0]),
                y: Axis::Seed(vec![1]),
                steps: 2,
                cfg_scale: 4.0,
                sampler: Sampler::Euler,
                width: 32,
                height: 32,
                cell_scale: 1,
            }),
        );
        let evaluation = world.run(
            "quality",
            NodeParams::Evaluate(EvaluateParams {
                base: world.file("base.safetensors"),
                base_config: None,
                lora: Input::Node("lora".into()),
                meter: World::meter(),
                weights: vec![-1.0, 0.0, 1.0],
                seeds: vec![1],
                prompts: vec!["1girl, side view".into()],
                negative_prompt: String::new(),
                steps: 2,
                cfg_scale: 4.0,
                sampler: Sampler::EulerA,
                width: 32,
                height: 32,
            }),
        );
        let got = [train, plot, evaluation];
        // The matrix kernels are picked at run time from the CPU's SIMD features, and the
        // families round differently, so each CPU family has its golden set, recorded on such
        // a machine. A code change moves every set; a machine must match one of them in full.
        // Train code version 3 moved the trained LoRA (and with it the plot of it) on every
        // family; only this family could be re-recorded since, so the sets of the other
        // families seen before (AVX2 + FMA without AVX-512, and the first machine) are gone:
        // on such a machine this test prints its hashes to record. Train 4 / xy_plot 2 /
        // evaluate 2 (the AVX-512 matrix kernel) moved this family's set again. Train 5 (the
        // fused CPU attention) moved the trained LoRA; the plot's and the evaluation's images
        // kept their bytes here (their 8-bit pixels hide the attention's rounding on these
        // inputs), but xy_plot 3 and evaluate 3 are bumped all the same: the floats behind
        // every image changed, and a pixel on a rounding boundary can flip elsewhere.
        //
        // An Intel Xeon with AVX-512 (F, VL, BW, DQ, VNNI, VBMI2, IFMA, BITALG).
        let recorded_on_intel_avx512 = [
            hashes(&[
                (
                    "lora.safetensors",
                    "7ee50a44370b9ea9cdf413a6a794da4310d40ea7b54b296deba4a73f80aab118",
                ),
                (
                    "loss.csv",
                    "ab78acf42c45af62636602fc9326383eb1b627788e0348a6c625545d6fd0389d",
                ),
            ]),
            hashes(&[(
                "grid.png",
                "eb7305f6914e00545bf7648315cac2400b07b37c65aeaa3f3cdb5115b6eadfb8",
            )]),
            hashes(&[
                (
                    "quality.json",
                    "a8a46b9f5063fadbdeb045a169e6effaabedc3a99764714f8018f44b9b96ff78",
                ),
                (
                    "quality.md",
                    "bb455654f267f4badb7a97a6e9c05a122c594d4ba8ef207a2efa8139cc6cd57a",
                ),
                (
                    "grid.png",
                    "6812ab3d6c4ab2644fc7fe7e54ba816350ef234b6a4c456cabe738dfbc707c2d",
                ),
            ]),
        ];
        assert!(
            got == recorded_on_intel_avx512,
            "matches no recorded CPU family: {got:#?}"
        );
    }

    /// Every optimizer, schedule and sampler the recipe accepts reaches the worker and runs.
    #[test]
    fn every_recipe_choice_runs_in_the_worker() {
        let world = World::new();
        for &optimizer in Optimizer::ALL {
            for &schedule in LrScheduler::ALL {
                let node = format!("{}-{}", optimizer.name(), schedule.name());
                let mut params = train_params(&world, optimizer, schedule);
                params.max_train_steps = 1;
                let out = world.run(&node, NodeParams::Train(params));
                assert_eq!(out.len(), 2, "{node}");
            }
        }
        // The LoRA the plots weigh.
        world.run(
            "lora",
            NodeParams::Train(train_params(
                &world,
                Optimizer::AdamW,
                LrScheduler::Constant,
            )),
        );
        for &sampler in Sampler::ALL {
            let out = world.run(
                sampler.name(),
                NodeParams::XyPlot(XyPlotParams {
                    base: world.file("base.safetensors"),
                    base_config: None,
                    loras: vec![Input::Node("lora".into())],
                    prompt: "a face".into(),
                    negative_prompt: String::new(),
                    x: Axis::Weight(vec![1.0]),
                    y: Axis::Seed(vec![1]),
                    steps: 2,
                    cfg_scale: 4.0,
                    sampler,
                    width: 32,
                    height: 32,
                    cell_scale: 1,
                }),
            );
            assert_eq!(out.len(), 1, "{}", sampler.name());
        }
    }

    #[test]
    fn kinds_of_the_engine_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let req = Request {
            node: "m".into(),
            key: "k".into(),
            kind: "merge".into(),
            params: NodeParams::Merge(MergeParams {
                models: vec![],
                ratios: vec![],
                save_precision: Precision::Float,
            }),
            inputs: vec![],
            work_dir: dir.path().to_path_buf(),
            output_dir: dir.path().to_path_buf(),
        };
        let err = execute(&req, "cpu", &mut |_| {}, &AtomicBool::new(false)).unwrap_err();
        assert!(err.contains("`merge` runs in the engine"), "{err}");
        assert!(KINDS.iter().all(|k| k.name != "merge"));
    }
}

//! The recipes in `recipes/` parse, expand and compile to the DAG of METHOD.md. Their input
//! files (the tiny base model, the training pairs, the six LoRAs) are replaced by empty
//! stand-ins in a temporary copy, so these tests check the recipe, not the assets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use slider_recipe::{Axis, DynamicMethod, Input, NodeParams, Plan, Precision, load};

const ANGLES: [&str; 3] = ["front", "45deg", "side"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Copies `recipes/NAME` into a temp dir laid out like the repository, with empty files at
/// `stand_ins` (paths relative to the repository root).
fn staged(name: &str, stand_ins: &[String]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("recipes")).unwrap();
    let recipe = dir.path().join("recipes").join(name);
    std::fs::copy(repo().join("recipes").join(name), &recipe).unwrap();
    for f in stand_ins {
        let p = dir.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"").unwrap();
    }
    (dir, recipe)
}

fn pair_images() -> Vec<String> {
    let mut v = Vec::new();
    for size in ["small", "big"] {
        for a in ANGLES {
            v.push(format!("assets/pairs/{size}_{a}.png"));
        }
    }
    v
}

fn kinds(plan: &Plan) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for n in &plan.nodes {
        *m.entry(n.params.kind()).or_default() += 1;
    }
    m
}

fn node<'p>(plan: &'p Plan, name: &str) -> &'p NodeParams {
    &plan
        .nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
        .params
}

fn inputs_of(plan: &Plan, name: &str) -> Vec<String> {
    node(plan, name)
        .inputs()
        .into_iter()
        .map(|i| match i {
            Input::Node(n) => n.clone(),
            Input::File(p) => p.file_name().unwrap().to_string_lossy().into_owned(),
        })
        .collect()
}

/// The merge/resize half shared by every eyesize recipe.
fn check_merge_half(plan: &Plan) {
    for a in ANGLES {
        let NodeParams::SvdMerge(m) = node(plan, &format!("slider_{a}")) else {
            panic!("slider_{a} is not an svd_merge")
        };
        assert_eq!(m.ratios, vec![1.5, -1.5]);
        assert_eq!((m.new_rank, m.new_conv_rank), (8, 8));
        assert_eq!(m.clamp_quantile, Some(0.99));
        assert_eq!(m.save_precision, Precision::Float);
    }
    assert_eq!(
        inputs_of(plan, "slider"),
        ["slider_front", "slider_45deg", "slider_side"]
    );
    let NodeParams::Resize(r) = node(plan, "eyesize") else {
        panic!("eyesize is not a resize")
    };
    assert_eq!(r.model, Input::Node("slider".into()));
    assert_eq!(r.new_rank, 4);
    assert_eq!(r.dynamic_method, Some(DynamicMethod::SvFro));
    assert_eq!(r.dynamic_param, Some(0.75));
    assert_eq!(r.save_precision, Precision::Fp16);
}

fn assert_topological(plan: &Plan) {
    for e in plan.graph.edge_indices() {
        let (a, b) = plan.graph.edge_endpoints(e).unwrap();
        assert!(plan.graph[a] < plan.graph[b], "edge against the order");
    }
}

#[test]
fn eyesize_is_the_method_dag() {
    let mut files = pair_images();
    files.push("assets/tiny-sd/tiny-sd.safetensors".into());
    files.push("assets/eye-meter/eye-meter.safetensors".into());
    let (dir, recipe) = staged("eyesize.yaml", &files);
    let plan = load(&recipe, &[]).unwrap();

    let expected: BTreeMap<&str, usize> = [
        ("train", 6),
        ("svd_merge", 4),
        ("resize", 1),
        ("xy_plot", 7),
        ("evaluate", 2),
    ]
    .into();
    assert_eq!(kinds(&plan), expected);
    check_merge_half(&plan);
    for a in ANGLES {
        assert_eq!(
            inputs_of(&plan, &format!("slider_{a}")),
            [format!("big_{a}"), format!("small_{a}")]
        );
        for size in ["small", "big"] {
            let NodeParams::Train(t) = node(&plan, &format!("{size}_{a}")) else {
                panic!()
            };
            assert_eq!(
                t.images,
                [Input::File(
                    dir.path().join(format!("assets/pairs/{size}_{a}.png"))
                )]
            );
            assert_eq!(
                t.base,
                Input::File(dir.path().join("assets/tiny-sd/tiny-sd.safetensors"))
            );
            assert_eq!(t.optimizer_type.name(), "CAME");
            assert_eq!(t.learning_rate, 5e-5);
            assert_eq!((t.train_batch_size, t.network_dim), (1, 4));
            assert_eq!(t.network_alpha, 1.0);
            assert_eq!(t.lr_warmup_steps, 20);
            assert_eq!(t.lr_scheduler.name(), "constant_with_warmup");
            assert!(t.network_train_unet_only);
            assert_eq!(
                t.max_train_steps, 200,
                "the best of the ablation's 200 / 400 / 800"
            );
            assert_eq!(t.resolution, 64, "the tiny base model's size");
            let NodeParams::XyPlot(x) = node(&plan, &format!("check_{size}_{a}")) else {
                panic!()
            };
            let Axis::Lora(l) = &x.x else { panic!() };
            assert_eq!(l, &[None, Some(Input::Node(format!("{size}_{a}")))]);
            assert!(matches!(&x.y, Axis::Seed(s) if s.len() == 3));
        }
    }
    let NodeParams::XyPlot(x) = node(&plan, "check_eyesize") else {
        panic!()
    };
    assert!(matches!(&x.x, Axis::Weight(w) if w == &[-2.0, -1.0, 0.0, 1.0, 2.0]));
    assert_eq!(x.loras, [Input::Node("eyesize".into())]);
    assert_eq!(
        plan.outputs["eyesize"],
        dir.path().join("recipes/out/eyesize.safetensors")
    );
    for (name, lora, prompts) in [
        ("quality_eyesize", "eyesize", 3),
        ("quality_side", "slider_side", 1),
    ] {
        let NodeParams::Evaluate(e) = node(&plan, name) else {
            panic!("{name} is not an evaluate node")
        };
        assert_eq!(e.lora, Input::Node(lora.into()));
        assert_eq!(e.prompts.len(), prompts);
        assert_eq!(
            e.meter,
            Input::File(dir.path().join("assets/eye-meter/eye-meter.safetensors"))
        );
        assert!(e.weights.contains(&0.0));
    }
    assert_eq!(plan.outputs.len(), 10);
    assert_eq!(plan.graph.node_count(), 20);
    // 6 trains -> 3 merges (6), 3 -> slider, slider -> eyesize, 6 + 1 checks, 2 evaluations.
    assert_eq!(plan.graph.edge_count(), 6 + 3 + 1 + 6 + 1 + 2);
    assert_topological(&plan);

    let quick = load(&recipe, &["train.max_train_steps=10".into()]).unwrap();
    let NodeParams::Train(t) = node(&quick, "big_side") else {
        panic!()
    };
    assert_eq!(t.max_train_steps, 10);
}

#[test]
fn merge_only_needs_no_trainer() {
    let mut files = Vec::new();
    for size in ["small", "big"] {
        for a in ANGLES {
            files.push(format!("assets/loras/{size}_{a}.safetensors"));
        }
    }
    let (_dir, recipe) = staged("merge-only.yaml", &files);
    let plan = load(&recipe, &[]).unwrap();
    let expected: BTreeMap<&str, usize> = [("svd_merge", 4), ("resize", 1)].into();
    assert_eq!(kinds(&plan), expected);
    check_merge_half(&plan);
    for a in ANGLES {
        assert_eq!(
            inputs_of(&plan, &format!("slider_{a}")),
            [
                format!("big_{a}.safetensors"),
                format!("small_{a}.safetensors")
            ]
        );
    }
    assert_eq!(plan.outputs.keys().collect::<Vec<_>>(), ["eyesize"]);
    assert_topological(&plan);
}

#[test]
fn merge_only_loads_in_place_on_the_shipped_loras() {
    let plan = load(&repo().join("recipes/merge-only.yaml"), &[]).unwrap();
    check_merge_half(&plan);
}

#[test]
fn eyesize_sdxl_needs_the_users_base() {
    let (dir, recipe) = staged("eyesize-sdxl.yaml", &pair_images());
    let err = load(&recipe, &[]).unwrap_err();
    let codes: Vec<&str> = err.problems().iter().map(|p| p.code()).collect();
    assert_eq!(codes, ["recipe::unset_var"]);

    let ckpt = dir.path().join("sdxl.safetensors");
    std::fs::write(&ckpt, b"").unwrap();
    let set = format!("vars.base={}", ckpt.display());
    let plan = load(&recipe, &[set]).unwrap();
    let NodeParams::Train(t) = node(&plan, "small_45deg") else {
        panic!()
    };
    assert_eq!(t.base, Input::File(ckpt));
    assert_eq!(t.resolution, 1024);
    assert_eq!(t.optimizer_type.name(), "CAME");
    let NodeParams::XyPlot(x) = node(&plan, "check_eyesize") else {
        panic!()
    };
    assert_eq!((x.width, x.height), (1024, 1024));
    check_merge_half(&plan);
}

/// Route two: each big LoRA trains on the checkpoint the small one was baked into, and both
/// slider candidates are built and measured.
#[test]
fn eyesize_merged_base_trains_big_on_the_merged_checkpoint() {
    let mut files = pair_images();
    files.push("assets/tiny-sd/tiny-sd.safetensors".into());
    files.push("assets/eye-meter/eye-meter.safetensors".into());
    let (dir, recipe) = staged("eyesize-merged-base.yaml", &files);
    let plan = load(&recipe, &[]).unwrap();
    let base = Input::File(dir.path().join("assets/tiny-sd/tiny-sd.safetensors"));
    for a in ANGLES {
        let NodeParams::MergeIntoModel(m) = node(&plan, &format!("base_small_{a}")) else {
            panic!("base_small_{a} is not merge_into_model")
        };
        assert_eq!(m.base, base);
        assert_eq!(m.models, [Input::Node(format!("small_{a}"))]);
        assert_eq!(m.ratios, [1.0]);
        assert_eq!(m.save_precision, None);
        let NodeParams::Train(small) = node(&plan, &format!("small_{a}")) else {
            panic!()
        };
        assert_eq!(small.base, base);
        let NodeParams::Train(big) = node(&plan, &format!("big_{a}")) else {
            panic!()
        };
        assert_eq!(big.base, Input::Node(format!("base_small_{a}")));
    }
    for n in [
        "quality_big",
        "quality_diff",
        "quality_big_side",
        "quality_diff_side",
    ] {
        let NodeParams::Evaluate(e) = node(&plan, n) else {
            panic!()
        };
        assert_eq!(e.base, base, "{n} measures on the base model");
    }
    assert_eq!(kinds(&plan)["merge_into_model"], 3);
    assert_topological(&plan);
}

/// A checkpoint is not a LoRA: a merge_into_model node in a LoRA slot is refused at plan time.
#[test]
fn a_merged_checkpoint_is_refused_where_a_lora_goes() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["base.safetensors", "l.safetensors"] {
        std::fs::write(dir.path().join(f), b"").unwrap();
    }
    let recipe = dir.path().join("r.yaml");
    std::fs::write(
        &recipe,
        "base: base.safetensors\nnodes:\n  m:\n    kind: merge_into_model\n    models: [l.safetensors]\n    ratios: [1]\n  r:\n    kind: resize\n    model: m\n",
    )
    .unwrap();
    let err = load(&recipe, &[]).unwrap_err();
    let codes: Vec<&str> = err.problems().iter().map(|p| p.code()).collect();
    assert_eq!(codes, ["recipe::type_mismatch"]);
}

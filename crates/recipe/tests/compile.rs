//! What a valid recipe compiles to: matrix expansion, kohya defaults, `defaults:` and
//! `--set` precedence, `${var}` substitution, the reference rule, and the DAG's order.

use std::path::{Path, PathBuf};

use slider_recipe::{Axis, Input, NodeParams, Plan, Precision, RankRule, load_str};

/// A temp dir holding the recipe's input files (empty: only their existence matters here).
struct Dir(tempfile::TempDir);

impl Dir {
    fn new(files: &[&str]) -> Dir {
        let d = tempfile::tempdir().unwrap();
        for f in files {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
        Dir(d)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel)
    }

    fn load(&self, recipe: &str, set: &[&str]) -> Plan {
        self.try_load(recipe, set)
            .unwrap_or_else(|e| panic!("{e:?}\n{recipe}"))
    }

    fn try_load(&self, recipe: &str, set: &[&str]) -> Result<Plan, slider_recipe::RecipeError> {
        let set: Vec<String> = set.iter().map(|s| s.to_string()).collect();
        load_str(recipe, &self.path("recipe.yaml"), &set)
    }
}

fn names(plan: &Plan) -> Vec<&str> {
    plan.nodes.iter().map(|n| n.name.as_str()).collect()
}

fn params<'p>(plan: &'p Plan, name: &str) -> &'p NodeParams {
    &plan.nodes.iter().find(|n| n.name == name).unwrap().params
}

macro_rules! get {
    ($plan:expr, $name:expr, $variant:ident) => {
        match params(&$plan, $name) {
            NodeParams::$variant(p) => p,
            other => panic!("{} is a {}", $name, other.kind()),
        }
    };
}

const FILES: &[&str] = &[
    "base.safetensors",
    "other.safetensors",
    "a.safetensors",
    "b.safetensors",
    "img/small_front.png",
    "img/small_side.png",
    "img/big_front.png",
    "img/big_side.png",
];

#[test]
fn matrix_expands_the_cross_product_of_the_variables_each_node_uses() {
    let dir = Dir::new(FILES);
    let plan = dir.load(
        r#"
base: base.safetensors
matrix:
  size: [small, big]
  angle: [front, side]
nodes:
  lora_${size}_${angle}:
    kind: train
    network_train_unet_only: true
    images: ["img/${size}_${angle}.png"]
    caption: "${size} eyes, ${angle} view"
  per_angle_${angle}:
    kind: svd_merge
    models: ["lora_big_${angle}", "lora_small_${angle}"]
    ratios: [1.5, -1.5]
  all:
    kind: svd_merge
    models: [per_angle_front, per_angle_side]
    ratios: [1, 1]
"#,
        &[],
    );
    assert_eq!(
        names(&plan),
        [
            "lora_small_front",
            "lora_small_side",
            "lora_big_front",
            "lora_big_side",
            "per_angle_front",
            "per_angle_side",
            "all"
        ]
    );
    let t = get!(plan, "lora_big_side", Train);
    assert_eq!(t.caption, "big eyes, side view");
    assert_eq!(t.images, [Input::File(dir.path("img/big_side.png"))]);
    let m = get!(plan, "per_angle_side", SvdMerge);
    assert_eq!(
        m.models,
        [
            Input::Node("lora_big_side".into()),
            Input::Node("lora_small_side".into())
        ]
    );
}

#[test]
fn unset_parameters_take_kohyas_defaults() {
    let dir = Dir::new(FILES);
    let plan = dir.load(
        r#"
base: base.safetensors
nodes:
  t: {kind: train, images: [img/big_front.png], network_train_unet_only: true}
  m: {kind: svd_merge, models: [a.safetensors], ratios: [1]}
  m16: {kind: svd_merge, models: [a.safetensors], ratios: [1], new_rank: 8, precision: fp16, clamp_quantile: null}
  r: {kind: resize, model: a.safetensors, new_rank: 6}
  reach: {kind: resize, model: a.safetensors, dynamic_method: sv_fro, dynamic_param: 0.9, rank_rule: reach-threshold}
  p: {kind: merge, models: [a.safetensors, b.safetensors], ratios: [1, -1]}
  g: {kind: xy_plot, prompt: 1girl, loras: [m], x: {weight: [0, 1]}}
"#,
        &[],
    );
    let t = get!(plan, "t", Train);
    assert_eq!(t.base, Input::File(dir.path("base.safetensors")));
    assert_eq!(t.learning_rate, 2e-6);
    assert_eq!(t.unet_lr, None);
    assert_eq!(
        (t.train_batch_size, t.max_train_steps, t.network_dim),
        (1, 1600, 4)
    );
    assert_eq!(t.network_alpha, 1.0);
    assert_eq!((t.conv_dim, t.conv_alpha), (None, None));
    // kohya's default `network_train_unet_only: false` is refused (tests/malformed.rs):
    // text-encoder training is not implemented.
    assert!(t.network_train_unet_only && !t.gradient_checkpointing);
    assert_eq!(t.training_comment, "");
    assert_eq!((t.lr_scheduler.name(), t.lr_warmup_steps), ("constant", 0));
    assert_eq!(t.optimizer_type.name(), "AdamW");
    assert!(t.optimizer_args.is_empty());
    assert_eq!((t.seed, t.resolution, t.checkpoint_every), (0, 512, 100));
    assert_eq!((t.noise_offset, t.min_snr_gamma), (0.0, None));
    assert_eq!(t.mixed_precision.name(), "no");
    assert_eq!(t.save_precision, Precision::Float);
    assert_eq!(t.caption, "");

    let m = get!(plan, "m", SvdMerge);
    assert_eq!((m.new_rank, m.new_conv_rank), (4, 4));
    assert_eq!(
        (m.precision, m.save_precision),
        (Precision::Float, Precision::Float)
    );
    assert_eq!(m.clamp_quantile, Some(0.99));
    let m16 = get!(plan, "m16", SvdMerge);
    assert_eq!((m16.new_rank, m16.new_conv_rank), (8, 8));
    assert_eq!(
        m16.save_precision,
        Precision::Fp16,
        "save_precision follows precision"
    );
    assert_eq!(m16.clamp_quantile, None);

    let r = get!(plan, "r", Resize);
    assert_eq!((r.new_rank, r.new_conv_rank), (6, 6));
    assert_eq!((r.dynamic_method, r.dynamic_param), (None, None));
    assert_eq!(r.rank_rule, RankRule::OnePastThreshold);
    let reach = get!(plan, "reach", Resize);
    assert_eq!(reach.rank_rule, RankRule::ReachThreshold);
    assert_eq!(r.save_precision, Precision::Float);

    let p = get!(plan, "p", Merge);
    assert_eq!(p.ratios, [1.0, -1.0]);
    assert_eq!(p.save_precision, Precision::Float);

    let g = get!(plan, "g", XyPlot);
    assert_eq!((g.steps, g.width, g.height), (20, 512, 512));
    assert_eq!(g.cfg_scale, 7.0);
    assert_eq!(g.sampler.name(), "euler_a");
    assert_eq!(g.negative_prompt, "");
    assert!(matches!(&g.y, Axis::Seed(s) if s == &[0]));
}

#[test]
fn training_options_are_normalised_like_kohya() {
    let dir = Dir::new(FILES);
    /// (node parameters, expected scheduler, optimizer, optimizer_args)
    type Case = (
        &'static str,
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
    );
    let cases: &[Case] = &[
        ("lr_warmup_steps: 20", "constant_with_warmup", "AdamW", &[]),
        (
            "{lr_warmup_steps: 20, lr_scheduler: cosine}",
            "cosine",
            "AdamW",
            &[],
        ),
        ("optimizer_type: came", "constant", "CAME", &[]),
        ("optimizer_type: ''", "constant", "AdamW", &[]),
        (
            "optimizer_args: [\"weight_decay=0.01\", \"betas=0.9,0.99\"]",
            "constant",
            "AdamW",
            &[("betas", "0.9,0.99"), ("weight_decay", "0.01")],
        ),
        (
            "optimizer_args: {weight_decay: 0.01}",
            "constant",
            "AdamW",
            &[("weight_decay", "0.01")],
        ),
    ];
    for (extra, scheduler, optimizer, args) in cases {
        let extra = if extra.starts_with('{') {
            extra.trim_matches(['{', '}']).to_string()
        } else {
            extra.to_string()
        };
        let recipe = format!(
            "base: base.safetensors\nnodes:\n  t: {{kind: train, images: [img/big_front.png], network_train_unet_only: true, {extra}}}\n"
        );
        let plan = dir.load(&recipe, &[]);
        let t = get!(plan, "t", Train);
        assert_eq!(t.lr_scheduler.name(), *scheduler, "{extra}");
        assert_eq!(t.optimizer_type.name(), *optimizer, "{extra}");
        let got: Vec<(&str, &str)> = t
            .optimizer_args
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(got, *args, "{extra}");
    }
}

/// `mixed_precision` reaches the burn trainer; `no_half_vae` only where there is a half VAE
/// to keep in f32 (under `no` it changes nothing, so it does not enter the key either).
#[test]
fn mixed_precision_and_no_half_vae_reach_the_trainer() {
    let dir = Dir::new(FILES);
    for (extra, precision, no_half_vae) in [
        ("mixed_precision: bf16", "bf16", false),
        ("mixed_precision: fp16, no_half_vae: true", "fp16", true),
        ("mixed_precision: no, no_half_vae: true", "no", false),
        (
            "no_half_vae: true, gradient_checkpointing: true",
            "no",
            false,
        ),
    ] {
        let recipe = format!(
            "base: base.safetensors\nnodes:\n  t: {{kind: train, images: [img/big_front.png], network_train_unet_only: true, {extra}}}\n"
        );
        let plan = dir.load(&recipe, &[]);
        let t = get!(plan, "t", Train);
        assert_eq!(
            (t.mixed_precision.name(), t.no_half_vae),
            (precision, no_half_vae),
            "{extra}"
        );
    }
}

const LAYERED: &str = r#"
base: base.safetensors
vars:
  lr: 5.0e-5
  steps: 400
matrix:
  angle: [front, side]
defaults:
  train:
    network_train_unet_only: true
    learning_rate: ${lr}
    max_train_steps: ${steps}
nodes:
  small_${angle}:
    kind: train
    images: ["img/small_${angle}.png"]
  big_${angle}:
    kind: train
    images: ["img/big_${angle}.png"]
    max_train_steps: 300
outputs:
  big_${angle}: "out/big_${angle}.safetensors"
"#;

#[test]
fn set_overrides_follow_their_documented_precedence() {
    let dir = Dir::new(FILES);
    // (overrides, expected max_train_steps of small_front, of big_front, learning rate)
    let cases: &[(&[&str], usize, usize, f64)] = &[
        (&[], 400, 300, 5e-5),
        // A kind-level override replaces the default; nodes that set the key keep theirs.
        (&["train.max_train_steps=10"], 10, 300, 5e-5),
        (&["defaults.train.max_train_steps=10"], 10, 300, 5e-5),
        // A node-level override wins over everything.
        (&["nodes.big_front.max_train_steps=7"], 400, 7, 5e-5),
        (&["vars.steps=20", "vars.lr=1e-4"], 20, 300, 1e-4),
        // Later overrides of the same key win.
        (
            &["train.max_train_steps=10", "train.max_train_steps=11"],
            11,
            300,
            5e-5,
        ),
        // An override value may use the recipe's variables.
        (
            &["nodes.small_front.max_train_steps=${steps}"],
            400,
            300,
            5e-5,
        ),
    ];
    for (set, small, big, lr) in cases {
        let plan = dir.load(LAYERED, set);
        let s = get!(plan, "small_front", Train);
        let b = get!(plan, "big_front", Train);
        assert_eq!(
            (s.max_train_steps, b.max_train_steps),
            (*small, *big),
            "{set:?}"
        );
        assert_eq!(s.learning_rate, *lr, "{set:?}");
        let side = get!(plan, "big_side", Train);
        assert_eq!(
            side.max_train_steps, 300,
            "{set:?} must touch big_front only"
        );
    }
}

#[test]
fn set_can_narrow_the_matrix_and_move_base_and_outputs() {
    let dir = Dir::new(FILES);
    let plan = dir.load(
        LAYERED,
        &[
            "matrix.angle=[side]",
            "base=other.safetensors",
            "outputs.big_side=elsewhere/big.safetensors",
        ],
    );
    assert_eq!(names(&plan), ["small_side", "big_side"]);
    let t = get!(plan, "small_side", Train);
    assert_eq!(t.base, Input::File(dir.path("other.safetensors")));
    assert_eq!(
        plan.outputs.get("big_side"),
        Some(&dir.path("elsewhere/big.safetensors"))
    );
    let plan = dir.load(LAYERED, &[]);
    let outputs: Vec<(&str, PathBuf)> = plan
        .outputs
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    assert_eq!(
        outputs,
        [
            ("big_front", dir.path("out/big_front.safetensors")),
            ("big_side", dir.path("out/big_side.safetensors"))
        ]
    );
}

#[test]
fn whole_string_variables_keep_their_type() {
    let dir = Dir::new(FILES);
    let plan = dir.load(
        r#"
base: base.safetensors
vars:
  seeds: [1, 2, 3]
  seed: 7
  dir: img
  file: ${dir}/big_front.png
nodes:
  t: {kind: train, images: ["${file}"], seed: "${seed}", network_train_unet_only: true}
  g: {kind: xy_plot, prompt: "seed ${seed}", x: {seed: "${seeds}"}}
"#,
        &[],
    );
    let t = get!(plan, "t", Train);
    assert_eq!(t.seed, 7);
    assert_eq!(t.images, [Input::File(dir.path("img/big_front.png"))]);
    let g = get!(plan, "g", XyPlot);
    assert_eq!(g.prompt, "seed 7");
    assert!(matches!(&g.x, Axis::Seed(s) if s == &[1, 2, 3]));
}

#[test]
fn a_string_equal_to_a_node_name_is_a_reference_anything_else_a_file() {
    let dir = Dir::new(&["a.safetensors", "merged", "sub/b.safetensors"]);
    let abs = dir.path("a.safetensors");
    let recipe = format!(
        r#"
nodes:
  merged: {{kind: merge, models: [a.safetensors, ./sub/../sub/b.safetensors, "{}"], ratios: [1, 1, 1]}}
  by_name: {{kind: resize, model: merged}}
  by_path: {{kind: command, run: [cat, "{{f}}"], inputs: {{f: ./merged}}, outputs: {{o: o.txt}}}}
"#,
        abs.display()
    );
    let plan = dir.load(&recipe, &[]);
    let m = get!(plan, "merged", Merge);
    assert_eq!(
        m.models,
        [
            Input::File(dir.path("a.safetensors")),
            Input::File(dir.path("sub/b.safetensors")),
            Input::File(abs.clone()),
        ]
    );
    assert_eq!(
        get!(plan, "by_name", Resize).model,
        Input::Node("merged".into())
    );
    assert_eq!(
        get!(plan, "by_path", Command).inputs["f"],
        Input::File(dir.path("merged"))
    );
}

#[test]
fn nodes_come_in_dependency_order_with_their_edges_and_origins() {
    let dir = Dir::new(FILES);
    let recipe = "\
nodes:
  final:
    kind: resize
    model: merged
  merged:
    kind: svd_merge
    models: [lora, b.safetensors]
    ratios: [1, -1]
  lora:
    kind: command
    run: [python, make.py, '{out}', '{log}']
    outputs: {out: lora.safetensors, log: log.txt}
";
    let plan = dir.load(recipe, &[]);
    assert_eq!(names(&plan), ["lora", "merged", "final"]);
    let edges: Vec<(&str, &str)> = plan
        .graph
        .edge_indices()
        .map(|e| {
            let (a, b) = plan.graph.edge_endpoints(e).unwrap();
            (
                plan.nodes[plan.graph[a]].name.as_str(),
                plan.nodes[plan.graph[b]].name.as_str(),
            )
        })
        .collect();
    assert_eq!(edges, [("lora", "merged"), ("merged", "final")]);
    let origin = &plan.nodes[2].origin;
    assert_eq!((origin.line, origin.column), (2, 3));
    assert_eq!(origin.file, dir.path("recipe.yaml"));
    assert_eq!(plan.root, dir.0.path());
    let c = get!(plan, "lora", Command);
    assert_eq!(
        c.outputs,
        [
            ("out".to_string(), "lora.safetensors".to_string()),
            ("log".to_string(), "log.txt".to_string())
        ]
    );
}

#[test]
fn load_reads_the_file_and_reports_unreadable_ones() {
    let dir = Dir::new(&["a.safetensors"]);
    let path = dir.path("r.yaml");
    std::fs::write(&path, "nodes:\n  r: {kind: resize, model: a.safetensors}\n").unwrap();
    let plan = slider_recipe::load(&path, &[]).unwrap();
    assert_eq!(plan.recipe_path, path);
    let err = slider_recipe::load(Path::new("/nonexistent/r.yaml"), &[]).unwrap_err();
    assert!(matches!(err, slider_recipe::RecipeError::Read { .. }));
    assert!(err.problems().is_empty());
}

#[test]
fn recipe_errors_can_cross_threads_and_render_with_miette() {
    fn assert_error<T: std::error::Error + miette::Diagnostic + Send + Sync + 'static>() {}
    assert_error::<slider_recipe::RecipeError>();
    assert_error::<slider_recipe::Problem>();
}

#[test]
fn evaluate_defaults_to_the_recipe_base_and_the_methods_weights() {
    let dir = Dir::new(&[FILES, &["meter.safetensors"]].concat());
    let plan = dir.load(
        r#"
base: base.safetensors
defaults:
  evaluate:
    prompts: ["1girl, side view"]
nodes:
  slider: {kind: svd_merge, models: [a.safetensors, b.safetensors], ratios: [1.5, -1.5]}
  quality: {kind: evaluate, lora: slider, meter: meter.safetensors}
  custom:
    kind: evaluate
    base: other.safetensors
    lora: a.safetensors
    meter: meter.safetensors
    weights: [0, 1]
    seeds: [7]
    prompts: [front, side]
    negative_prompt: lowres
    steps: 4
    cfg_scale: 5
    sampler: DDIM
    width: 64
    height: 72
"#,
        &["evaluate.steps=10"],
    );
    let q = get!(plan, "quality", Evaluate);
    assert_eq!(q.base, Input::File(dir.path("base.safetensors")));
    assert_eq!(q.lora, Input::Node("slider".into()));
    assert_eq!(q.meter, Input::File(dir.path("meter.safetensors")));
    assert_eq!(q.weights, [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]);
    assert_eq!(q.seeds, [1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(q.prompts, ["1girl, side view"]);
    assert_eq!(
        (q.negative_prompt.as_str(), q.steps, q.cfg_scale),
        ("", 10, 7.0)
    );
    assert_eq!((q.sampler.name(), q.width, q.height), ("euler_a", 512, 512));
    let c = get!(plan, "custom", Evaluate);
    assert_eq!(c.base, Input::File(dir.path("other.safetensors")));
    assert_eq!(
        (c.weights.as_slice(), c.seeds.as_slice()),
        (&[0.0, 1.0][..], &[7][..])
    );
    assert_eq!(c.prompts, ["front", "side"]);
    assert_eq!(
        (c.negative_prompt.as_str(), c.steps, c.cfg_scale),
        ("lowres", 4, 5.0)
    );
    assert_eq!((c.sampler.name(), c.width, c.height), ("ddim", 64, 72));
    assert_eq!(params(&plan, "quality").inputs().len(), 3);
    let slider = plan.nodes.iter().position(|n| n.name == "slider").unwrap();
    let quality = plan.nodes.iter().position(|n| n.name == "quality").unwrap();
    assert!(slider < quality, "the LoRA is evaluated after it is made");
}

/// `base_config` (the base model's diffusers config.json) goes where `base` goes: the
/// top-level one to every train, xy_plot and evaluate node that does not set its own, and
/// `--set base_config=...` moves it; nodes of other kinds take none.
#[test]
fn base_config_is_inherited_by_base_nodes_and_overridable() {
    let dir = Dir::new(
        &[
            FILES,
            &["meter.safetensors", "unet.json", "other.json", "set.json"],
        ]
        .concat(),
    );
    let recipe = r#"
base: base.safetensors
base_config: unet.json
nodes:
  slider:
    kind: train
    network_train_unet_only: true
    images: [img/small_front.png]
  own:
    kind: train
    network_train_unet_only: true
    images: [img/small_side.png]
    base_config: other.json
  grid: {kind: xy_plot, prompt: 1girl, loras: [slider], x: {weight: [0, 1]}}
  quality: {kind: evaluate, lora: slider, meter: meter.safetensors, prompts: [a]}
  merged: {kind: merge, models: [a.safetensors, b.safetensors], ratios: [1, 1]}
"#;
    let configs = |plan: &Plan| {
        (
            get!(plan, "slider", Train).base_config.clone(),
            get!(plan, "own", Train).base_config.clone(),
            get!(plan, "grid", XyPlot).base_config.clone(),
            get!(plan, "quality", Evaluate).base_config.clone(),
        )
    };
    let file = |name: &str| Some(Input::File(dir.path(name)));
    // (overrides, slider's, own's, grid's, quality's)
    let cases: [(&[&str], _, _, _, _); 5] = [
        (
            &[],
            file("unet.json"),
            file("other.json"),
            file("unet.json"),
            file("unet.json"),
        ),
        (
            &["base_config=set.json"],
            file("set.json"),
            file("other.json"),
            file("set.json"),
            file("set.json"),
        ),
        // Per node, and per kind.
        (
            &["nodes.grid.base_config=set.json"],
            file("unet.json"),
            file("other.json"),
            file("set.json"),
            file("unet.json"),
        ),
        (
            &["train.base_config=set.json"],
            file("set.json"),
            file("other.json"),
            file("unet.json"),
            file("unet.json"),
        ),
        // `null` takes it away: the nodes are keyed as if it had never been written.
        (&["base_config=null"], None, file("other.json"), None, None),
    ];
    for (set, slider, own, grid, quality) in cases {
        let plan = dir.load(recipe, set);
        assert_eq!(configs(&plan), (slider, own, grid, quality), "{set:?}");
    }
    // It is an input of the nodes that have it, after `base`.
    let plan = dir.load(recipe, &[]);
    assert_eq!(
        params(&plan, "quality").inputs(),
        [
            &Input::File(dir.path("base.safetensors")),
            &Input::File(dir.path("unet.json")),
            &Input::Node("slider".into()),
            &Input::File(dir.path("meter.safetensors")),
        ]
    );
    assert_eq!(params(&plan, "merged").inputs().len(), 2);
    // A config written by a command node is a node reference, like any input.
    let plan = dir.load(
        r#"
base: base.safetensors
base_config: make_config
nodes:
  make_config:
    kind: command
    run: [python, convert.py, '{out}']
    outputs: {out: config.json}
  slider: {kind: train, network_train_unet_only: true, images: [img/big_front.png]}
"#,
        &[],
    );
    assert_eq!(
        get!(plan, "slider", Train).base_config,
        Some(Input::Node("make_config".into()))
    );
    assert_eq!(names(&plan), ["make_config", "slider"]);
    // Without one, none.
    let plan = dir.load(LAYERED, &[]);
    assert!(plan.nodes.iter().all(|n| match &n.params {
        NodeParams::Train(t) => t.base_config.is_none(),
        _ => true,
    }));
}

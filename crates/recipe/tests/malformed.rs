//! Malformed recipes and the messages users get for them: one row per mistake, each with
//! the problem codes it must produce and a snapshot of the rendered miette report (unicode,
//! no colour, 100 columns). The recipes live in `tests/fixtures/`, next to a few empty files
//! they can name (`base.safetensors`, `small.safetensors`, `big.safetensors`, `small.png`,
//! `big.png`).

use std::path::Path;

use miette::{GraphicalReportHandler, GraphicalTheme};

struct Case {
    name: &'static str,
    recipe: &'static str,
    set: &'static [&'static str],
    /// The codes of the problems reported, in order.
    codes: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "unknown_top_level_key",
        recipe: "nodse:\n  a: {kind: resize, model: small.safetensors}\n",
        set: &[],
        codes: &["recipe::unknown_key"],
    },
    Case {
        name: "misspelled_parameter",
        recipe: "\
nodes:
  slider:
    kind: svd_merge
    models: [big.safetensors, small.safetensors]
    ratios: [1.5, -1.5]
    new_rnak: 8
",
        set: &[],
        codes: &["recipe::unknown_key"],
    },
    Case {
        name: "parameter_of_another_kind",
        recipe: "\
nodes:
  slider:
    kind: svd_merge
    models: [big.safetensors, small.safetensors]
    ratios: [1.5, -1.5]
    dynamic_method: sv_fro
",
        set: &[],
        codes: &["recipe::unknown_key"],
    },
    Case {
        name: "string_where_a_number_belongs",
        recipe: "\
nodes:
  small:
    kind: resize
    model: big.safetensors
    dynamic_method: sv_fro
    dynamic_param: three quarters
",
        set: &[],
        codes: &["recipe::wrong_type"],
    },
    Case {
        name: "text_encoder_training_is_refused",
        recipe: "\
base: base.safetensors
nodes:
  small:
    kind: train
    images: [small.png]
  big:
    kind: train
    images: [small.png]
    network_train_unet_only: false
",
        set: &[],
        codes: &["recipe::not_implemented", "recipe::not_implemented"],
    },
    Case {
        name: "mixed_precision_names_kohyas_choices",
        recipe: "\
base: base.safetensors
nodes:
  small:
    kind: train
    images: [small.png]
    network_train_unet_only: true
    mixed_precision: fp32
    gradient_checkpointing: true
",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "yes_is_not_a_boolean",
        recipe: "\
base: base.safetensors
nodes:
  small:
    kind: train
    images: [small.png]
    network_train_unet_only: yes
",
        set: &[],
        codes: &["recipe::wrong_type"],
    },
    Case {
        name: "negative_rank",
        recipe: "\
nodes:
  small:
    kind: resize
    model: big.safetensors
    new_rank: -4
",
        set: &[],
        codes: &["recipe::wrong_type"],
    },
    Case {
        name: "misspelled_kind",
        recipe: "nodes:\n  slider: {kind: svd_marge, models: [big.safetensors], ratios: [1]}\n",
        set: &[],
        codes: &["recipe::unknown_kind"],
    },
    Case {
        name: "node_without_kind",
        recipe: "nodes:\n  slider:\n    models: [big.safetensors]\n    ratios: [1]\n",
        set: &[],
        codes: &["recipe::missing_key"],
    },
    Case {
        name: "missing_ratios",
        recipe: "nodes:\n  slider:\n    kind: merge\n    models: [big.safetensors, small.safetensors]\n",
        set: &[],
        codes: &["recipe::missing_key"],
    },
    Case {
        name: "ratios_count_differs_from_models",
        recipe: "\
nodes:
  slider:
    kind: svd_merge
    models: [big.safetensors, small.safetensors]
    ratios: [1.5, -1.5, 1.0]
",
        set: &[],
        codes: &["recipe::ratio_count"],
    },
    Case {
        name: "reference_close_to_a_node_name",
        recipe: "\
nodes:
  slider_front:
    kind: svd_merge
    models: [big.safetensors, small.safetensors]
    ratios: [1.5, -1.5]
  eyesize:
    kind: resize
    model: slider_frnt
",
        set: &[],
        codes: &["recipe::unknown_node"],
    },
    Case {
        name: "missing_file",
        recipe: "\
nodes:
  slider:
    kind: svd_merge
    models: [big.safetensors, loras/small_front.safetensors]
    ratios: [1.5, -1.5]
",
        set: &[],
        codes: &["recipe::missing_file"],
    },
    Case {
        name: "cycle_of_three",
        recipe: "\
nodes:
  a: {kind: merge, models: [c, big.safetensors], ratios: [1, 1]}
  b: {kind: merge, models: [a], ratios: [1]}
  c: {kind: resize, model: b}
",
        set: &[],
        codes: &["recipe::cycle"],
    },
    Case {
        name: "node_reading_itself",
        recipe: "nodes:\n  a: {kind: merge, models: [a, big.safetensors], ratios: [1, 1]}\n",
        set: &[],
        codes: &["recipe::cycle"],
    },
    Case {
        name: "resize_fed_an_image",
        recipe: "\
base: base.safetensors
nodes:
  grid:
    kind: xy_plot
    prompt: 1girl
    loras: [big.safetensors]
    x: {weight: [0, 1]}
  small:
    kind: resize
    model: grid
",
        set: &[],
        codes: &["recipe::type_mismatch"],
    },
    Case {
        name: "command_output_that_is_not_a_lora",
        recipe: "\
nodes:
  convert:
    kind: command
    run: [python, convert.py, '{out}']
    outputs: {out: weights.bin}
  slider:
    kind: svd_merge
    models: [convert, small.safetensors]
    ratios: [1, -1]
",
        set: &[],
        codes: &["recipe::type_mismatch"],
    },
    Case {
        name: "training_images_from_a_lora",
        recipe: "\
base: base.safetensors
nodes:
  slider: {kind: merge, models: [big.safetensors], ratios: [1]}
  small:
    kind: train
    network_train_unet_only: true
    images: [slider]
",
        set: &[],
        codes: &["recipe::type_mismatch"],
    },
    Case {
        name: "warmup_with_constant_scheduler",
        recipe: "\
base: base.safetensors
nodes:
  small:
    kind: train
    network_train_unet_only: true
    images: [small.png]
    lr_scheduler: constant
    lr_warmup_steps: 20
",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "undefined_matrix_variable",
        recipe: "\
matrix:
  angle: [front, side]
nodes:
  slider_${angel}:
    kind: merge
    models: [big.safetensors]
    ratios: [1]
",
        set: &[],
        codes: &["recipe::undefined_var"],
    },
    Case {
        name: "matrix_variable_missing_from_the_name",
        recipe: "\
vars:
  loras: .
matrix:
  size: [small, big]
nodes:
  merged:
    kind: merge
    models: [\"${loras}/${size}.safetensors\"]
    ratios: [1]
",
        set: &[],
        codes: &["recipe::name_collision"],
    },
    Case {
        name: "expansion_collides_with_a_node",
        recipe: "\
matrix:
  size: [small, big]
nodes:
  lora_${size}:
    kind: merge
    models: [\"${size}.safetensors\"]
    ratios: [1]
  lora_big:
    kind: merge
    models: [big.safetensors]
    ratios: [2]
",
        set: &[],
        codes: &["recipe::name_collision"],
    },
    Case {
        name: "variable_in_an_unquoted_flow_list",
        recipe: "\
matrix:
  size: [small, big]
nodes:
  lora_${size}:
    kind: merge
    models: [${size}.safetensors]
    ratios: [1]
",
        set: &[],
        codes: &["recipe::yaml"],
    },
    Case {
        name: "output_of_an_unknown_node",
        recipe: "\
nodes:
  eyesize: {kind: resize, model: big.safetensors}
outputs:
  eyesise: out/eyesize.safetensors
",
        set: &[],
        codes: &["recipe::unknown_node"],
    },
    Case {
        name: "set_with_a_misspelled_kind",
        recipe: "nodes:\n  eyesize: {kind: resize, model: big.safetensors}\n",
        set: &["trian.max_train_steps=10"],
        codes: &["recipe::bad_set"],
    },
    Case {
        name: "set_of_an_unknown_node",
        recipe: "\
matrix:
  size: [small, big]
nodes:
  lora_${size}: {kind: resize, model: \"${size}.safetensors\"}
",
        set: &["nodes.lora_bgi.new_rank=2"],
        codes: &["recipe::bad_set"],
    },
    Case {
        name: "set_of_an_unknown_parameter",
        recipe: "nodes:\n  eyesize: {kind: resize, model: big.safetensors}\n",
        set: &["resize.new_rnak=2"],
        codes: &["recipe::unknown_key"],
    },
    Case {
        name: "set_with_a_value_of_the_wrong_type",
        recipe: "\
base: base.safetensors
nodes:
  small: {kind: train, images: [small.png], network_train_unet_only: true}
",
        set: &["train.max_train_steps=ten"],
        codes: &["recipe::wrong_type"],
    },
    Case {
        name: "set_without_equals",
        recipe: "nodes:\n  eyesize: {kind: resize, model: big.safetensors}\n",
        set: &["resize.new_rank"],
        codes: &["recipe::bad_set"],
    },
    Case {
        name: "invalid_yaml",
        recipe: "nodes:\n  eyesize:\n    kind: resize\n   model: big.safetensors\n",
        set: &[],
        codes: &["recipe::yaml"],
    },
    Case {
        name: "duplicate_node",
        recipe: "\
nodes:
  eyesize: {kind: resize, model: big.safetensors}
  eyesize: {kind: resize, model: small.safetensors}
",
        set: &[],
        codes: &["recipe::duplicate_key"],
    },
    Case {
        name: "variable_without_a_value",
        recipe: "\
vars:
  base: null
base: ${base}
nodes:
  small: {kind: train, images: [small.png], network_train_unet_only: true}
",
        set: &[],
        codes: &["recipe::unset_var"],
    },
    Case {
        name: "undeclared_command_placeholder",
        recipe: "\
nodes:
  upscale:
    kind: command
    run: [python, up.py, --in, '{src}', --out, '{outt}']
    inputs: {src: big.png}
    outputs: {out: big_x2.png}
",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "dynamic_method_without_param",
        recipe: "nodes:\n  eyesize: {kind: resize, model: big.safetensors, dynamic_method: sv_fro}\n",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "rank_rule_without_a_dynamic_method",
        recipe: "nodes:\n  eyesize: {kind: resize, model: big.safetensors, rank_rule: reach-threshold}\n",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "misspelled_rank_rule",
        recipe: "nodes:\n  eyesize: {kind: resize, model: big.safetensors, dynamic_method: sv_fro, dynamic_param: 0.9, rank_rule: reach}\n",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "unknown_precision",
        recipe: "nodes:\n  eyesize: {kind: resize, model: big.safetensors, save_precision: fp8}\n",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "weight_axis_without_a_lora",
        recipe: "\
base: base.safetensors
nodes:
  grid:
    kind: xy_plot
    prompt: 1girl
    x: {weight: [-1, 0, 1]}
",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "evaluate_without_lora_or_prompts",
        recipe: "\
base: base.safetensors
nodes:
  quality:
    kind: evaluate
    meter: big.safetensors
",
        set: &[],
        codes: &["recipe::missing_key", "recipe::missing_key"],
    },
    Case {
        name: "evaluate_weights_without_zero",
        recipe: "\
base: base.safetensors
nodes:
  quality:
    kind: evaluate
    lora: big.safetensors
    meter: small.safetensors
    prompts: [1girl]
    weights: [-2, -1, 1, 2]
",
        set: &[],
        codes: &["recipe::bad_value"],
    },
    Case {
        name: "evaluate_meter_from_an_image_node",
        recipe: "\
base: base.safetensors
nodes:
  grid:
    kind: xy_plot
    prompt: 1girl
    loras: [big.safetensors]
    x: {weight: [-1, 0, 1]}
  quality:
    kind: evaluate
    lora: big.safetensors
    meter: grid
    prompts: [1girl]
",
        set: &[],
        codes: &["recipe::type_mismatch"],
    },
    Case {
        name: "evaluate_with_empty_seeds_and_a_negative_seed",
        recipe: "\
base: base.safetensors
nodes:
  quality:
    kind: evaluate
    lora: big.safetensors
    meter: small.safetensors
    prompts: [1girl]
    seeds: []
  other:
    kind: evaluate
    lora: big.safetensors
    meter: small.safetensors
    prompts: [1girl]
    seeds: [1, -2]
",
        set: &[],
        codes: &["recipe::bad_value", "recipe::wrong_type"],
    },
    Case {
        name: "evaluate_misspelled_weights",
        recipe: "\
base: base.safetensors
nodes:
  quality:
    kind: evaluate
    lora: big.safetensors
    meter: small.safetensors
    prompts: [1girl]
    wieghts: [-1, 0, 1]
",
        set: &[],
        codes: &["recipe::unknown_key"],
    },
    Case {
        name: "base_config_file_missing",
        recipe: "\
base: base.safetensors
base_config: configs/unet.json
nodes:
  small:
    kind: train
    images: [small.png]
    network_train_unet_only: true
",
        set: &[],
        codes: &["recipe::missing_file"],
    },
    Case {
        name: "base_config_set_to_a_missing_file",
        recipe: "\
base: base.safetensors
nodes:
  grid:
    kind: xy_plot
    prompt: 1girl
    loras: [big.safetensors]
    x: {weight: [0, 1]}
",
        set: &["base_config=unet/config.json"],
        codes: &["recipe::missing_file"],
    },
    Case {
        name: "base_config_fed_a_lora",
        recipe: "\
base: base.safetensors
nodes:
  slider: {kind: merge, models: [big.safetensors], ratios: [1]}
  small:
    kind: train
    images: [small.png]
    network_train_unet_only: true
    base_config: slider
",
        set: &[],
        codes: &["recipe::type_mismatch"],
    },
    Case {
        name: "base_config_fed_an_image",
        recipe: "\
base: base.safetensors
nodes:
  grid:
    kind: xy_plot
    prompt: 1girl
    loras: [big.safetensors]
    x: {weight: [0, 1]}
  small:
    kind: train
    images: [small.png]
    network_train_unet_only: true
    base_config: grid
",
        set: &[],
        codes: &["recipe::type_mismatch"],
    },
    Case {
        name: "base_config_given_a_list",
        recipe: "\
base: base.safetensors
nodes:
  small:
    kind: train
    images: [small.png]
    network_train_unet_only: true
    base_config: [unet.json, vae.json]
",
        set: &[],
        codes: &["recipe::wrong_type"],
    },
    Case {
        name: "base_config_on_a_kind_without_base",
        recipe: "\
nodes:
  small:
    kind: resize
    model: big.safetensors
    base_config: small.safetensors
",
        set: &[],
        codes: &["recipe::unknown_key"],
    },
    Case {
        name: "several_independent_problems",
        recipe: "\
base: base.safetensors
defaults:
  train:
    max_train_step: 400
nodes:
  small:
    kind: train
    network_train_unet_only: true
    images: [small.png]
    learning_rate: fast
  slider:
    kind: svd_merge
    models: [small, big.safetensors]
    ratios: [-1.5, 1.5]
    new_rank: 0
outputs:
  slidr: slider.safetensors
",
        set: &[],
        codes: &[
            "recipe::unknown_key",
            "recipe::wrong_type",
            "recipe::bad_value",
            "recipe::unknown_node",
        ],
    },
];

fn render(err: &slider_recipe::RecipeError) -> String {
    let mut out = String::new();
    GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor())
        .with_width(100)
        .render_report(&mut out, err)
        .unwrap();
    out
}

#[test]
fn malformed_recipes_are_refused_with_their_expected_errors() {
    assert!(CASES.len() >= 20);
    let path = Path::new("tests/fixtures/recipe.yaml");
    for case in CASES {
        let set: Vec<String> = case.set.iter().map(|s| s.to_string()).collect();
        let err = match slider_recipe::load_str(case.recipe, path, &set) {
            Ok(_) => panic!("{}: the recipe was accepted", case.name),
            Err(e) => e,
        };
        let codes: Vec<&str> = err.problems().iter().map(|p| p.code()).collect();
        assert_eq!(codes, case.codes, "{}", case.name);
        for p in err.problems() {
            assert!(p.location().line >= 1, "{}: no location", case.name);
            assert!(p.help_text().is_some(), "{}: no help for `{p}`", case.name);
        }
        insta::assert_snapshot!(case.name, render(&err));
    }
}

//! Slider quality outside a recipe: the `evaluate` node's measurement on files given on the
//! command line, printing `quality.md` and the wall time.
//!
//! `cargo run -p slider-evaluate --example evaluate_slider -- BASE LORA METER OUT_DIR
//! [SEEDS] [STEPS] [SIZE] PROMPT...`: weights -2, -1, -0.5, 0, 0.5, 1, 2; seeds 1..=SEEDS
//! (default 8); STEPS sampling steps (default 20, Euler a, CFG 7); SIZE x SIZE pixels
//! (default 64); one evaluation per PROMPT (default `1girl, side view`).

use std::path::PathBuf;
use std::time::Instant;

use slider_evaluate::{self as evaluate, EvaluateConfig};
use slider_models::open_device;
use slider_models::sample::SamplerKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err(
            "usage: evaluate_slider BASE LORA METER OUT_DIR [SEEDS] [STEPS] [SIZE] PROMPT..."
                .into(),
        );
    }
    let number = |i: usize, default: usize| -> Result<usize, Box<dyn std::error::Error>> {
        Ok(args
            .get(i)
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let (seeds, steps, size) = (number(4, 8)?, number(5, 20)?, number(6, 64)?);
    let mut prompts: Vec<String> = args.iter().skip(7).cloned().collect();
    if prompts.is_empty() {
        prompts.push("1girl, side view".into());
    }
    let lora = PathBuf::from(&args[1]);
    let config = EvaluateConfig {
        base: PathBuf::from(&args[0]),
        base_config: None,
        lora_label: lora
            .file_stem()
            .map_or_else(|| "lora".into(), |s| s.to_string_lossy().into_owned()),
        lora,
        meter: PathBuf::from(&args[2]),
        weights: vec![-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0],
        seeds: (1..=seeds as u64).collect(),
        prompts,
        negative_prompt: String::new(),
        steps,
        cfg_scale: 7.0,
        sampler: SamplerKind::EulerAncestral,
        width: size,
        height: size,
    };
    let device = open_device("cpu")?;
    let out = PathBuf::from(&args[3]);
    let start = Instant::now();
    let report = evaluate::run(&config, &out, &device, |p| {
        eprint!("\r{}/{} {}        ", p.done, p.total, p.label);
    })?;
    eprintln!();
    print!("{}", evaluate::markdown(&report));
    println!(
        "\n{} images in {:.1} s; files in {}",
        report.samples.len(),
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

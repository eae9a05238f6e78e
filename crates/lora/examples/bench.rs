//! Times the LoRA benchmarks without building the CLI:
//! `cargo run --release -p slider-lora --example bench -- flux|sdxl [--fast-only] [--repeat N]`.
//! Prints the same rows as `slider-run bench lora` / `bench lora-flux`; with `--fast-only`
//! the dense path is skipped (its columns read 0).

use std::time::Instant;

use slider_lora::bench::{
    BenchRow, flux_bench_inputs, run_flux_pair, run_lora_chain, sdxl_bench_inputs,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map(String::as_str).unwrap_or("sdxl");
    let fast_only = args.iter().any(|a| a == "--fast-only");
    let repeat = args
        .iter()
        .position(|a| a == "--repeat")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1);
    let mut progress = |step: &str| eprintln!("  {step}");
    let start = Instant::now();
    let (sdxl, flux) = match which {
        "flux" => match flux_bench_inputs() {
            Ok(inputs) => (None, Some(inputs)),
            Err(e) => fail(&e.to_string()),
        },
        "sdxl" => (Some(sdxl_bench_inputs()), None),
        other => fail(&format!("unknown bench `{other}` (flux or sdxl)")),
    };
    println!(
        "inputs generated in {:.2} s (not timed by the bench)",
        start.elapsed().as_secs_f64()
    );
    for run in 0..repeat {
        let start = Instant::now();
        let cpu_start = process_cpu_seconds();
        let rows = match (&sdxl, &flux) {
            (Some(inputs), _) => run_lora_chain(inputs, &mut progress, !fast_only),
            (_, Some(inputs)) => run_flux_pair(inputs, &mut progress, !fast_only),
            _ => fail("no inputs"),
        };
        match rows {
            Ok(rows) => print_rows(
                run,
                &rows,
                start.elapsed().as_secs_f64(),
                process_cpu_seconds() - cpu_start,
            ),
            Err(e) => fail(&e.to_string()),
        }
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn print_rows(run: usize, rows: &[BenchRow], wall: f64, cpu: f64) {
    println!(
        "run {run}: wall {wall:.2} s, process CPU {cpu:.2} s (fast and, unless --fast-only, dense)"
    );
    println!("| operation | fast path (s) | dense path (s) | ratio |");
    for r in rows {
        println!(
            "| {} | {:.3} | {:.1} | {:.0}x |",
            r.operation,
            r.fast.as_secs_f64(),
            r.dense.as_secs_f64(),
            r.ratio()
        );
    }
}

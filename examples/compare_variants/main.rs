//! The flagship example: pretrain a small transformer on sorting digit sequences, then
//! adapt it to reversing them with full fine-tuning and each lorakit variant, and compare.
//!
//! ```text
//! cargo run --release --example compare_variants [-- --quick] [--seed N] [--out DIR]
//! ```
//!
//! Prints a table and writes `results.csv`, `results.json` and `loss_curves.svg` to the
//! output directory (default `target/compare_variants`).

mod core;
#[path = "../common/loss_plot.rs"]
mod loss_plot;
#[allow(dead_code)] // some items serve only the DoRA analysis and the tests
mod methods;
mod model;
mod report;
mod tasks;

use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};

use crate::core::{Progress, Settings};
use crate::methods::Method;

struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn start(&mut self, label: &str, steps: usize) {
        let bar = ProgressBar::new(steps as u64);
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>26} [{bar:30}] {pos}/{len} {per_sec} {wide_msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(label.to_string());
        self.bar = Some(bar);
    }

    fn step(&mut self, loss: f64) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            if bar.position() % 10 == 0 {
                bar.set_message(format!("loss {loss:.3}"));
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut quick = false;
    let mut seed = 0u64;
    let mut out = PathBuf::from("target/compare_variants");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--seed" => seed = args.next().ok_or("--seed needs a value")?.parse()?,
            "--out" => out = args.next().ok_or("--out needs a value")?.into(),
            "-h" | "--help" => {
                println!("usage: compare_variants [--quick] [--seed N] [--out DIR]");
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}` (try --help)").into()),
        }
    }
    let settings = if quick {
        Settings::quick(seed)
    } else {
        Settings::full(seed)
    };
    // Training on one of rayon's workers (`lorakit::threads::on_worker`).
    let (pre, results) = lorakit::threads::on_worker(|| {
        core::run(&settings, &Method::ALL, &mut Bars { bar: None })
    })?;
    println!(
        "pretrained on task A (sort): accuracy {:.1}% on A, {:.1}% on task B (reverse)\n",
        100.0 * pre.acc_task_a,
        100.0 * pre.acc_task_b
    );
    print!("{}", report::table(&results));
    for r in &results {
        if let Some(note) = &r.note {
            println!("{note}");
        }
        if r.trainable_params != r.expected_params {
            println!(
                "warning: {} trains {} parameters, its closed form gives {}",
                r.method.name(),
                r.trainable_params,
                r.expected_params
            );
        }
    }
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.csv"), report::csv(&results))?;
    std::fs::write(out.join("results.json"), report::json(&results))?;
    std::fs::write(out.join("loss_curves.svg"), report::loss_svg(&results))?;
    println!(
        "\nwrote {}/results.csv, results.json, loss_curves.svg",
        out.display()
    );
    Ok(())
}

//! The DoRA paper's weight-decomposition analysis (Liu et al. 2024, §2.2, Fig. 2) in
//! miniature: adapt the pretrained transformer of `compare_variants` to task B with full
//! fine-tuning, LoRA and DoRA, and at four checkpoints measure, per linear layer, how much
//! the weight's magnitude and direction moved away from the pretrained weight:
//!
//! ```text
//! ΔM = mean over output rows n of | ‖W_n‖ − ‖W0_n‖ |
//! ΔD = mean over output rows n of 1 − cos(W_n, W0_n)
//! ```
//!
//! (the paper's columns of a `d × k` weight are the output rows of candle's `(d_out, d_in)`
//! layout). It prints the Pearson correlation of ΔD and ΔM per method (the paper reports it
//! negative for full fine-tuning and DoRA, positive for LoRA) and writes a scatter plot per
//! method to `target/dora_analysis/dora_analysis.svg`.
//!
//! ```text
//! cargo run --release --example dora_analysis [-- --quick]
//! ```

#[allow(dead_code)] // shared with compare_variants; not every item is used here
#[path = "compare_variants/core.rs"]
mod core;
#[allow(dead_code)] // shared with compare_variants; not every item is used here
#[path = "compare_variants/methods.rs"]
mod methods;
#[allow(dead_code)] // shared with compare_variants; not every item is used here
#[path = "compare_variants/model.rs"]
mod model;
#[allow(dead_code)] // shared with compare_variants; not every item is used here
#[path = "compare_variants/tasks.rs"]
mod tasks;

use candle_core::{DType, Device, Tensor};
use lorakit::init::SeededRng;

use crate::core::{pretrain, Progress, Settings};
use crate::methods::Method;
use crate::model::linear_paths;
use crate::tasks::{batch, Task};

const CHECKPOINTS: usize = 4;

struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, label: &str, steps: usize) {
        println!("{label}: {steps} steps");
    }
    fn step(&mut self, _: f64) {}
    fn finish(&mut self) {}
}

/// (ΔM, ΔD) of `w` against `w0`, both `(d_out, d_in)`.
fn magnitude_direction_change(w: &Tensor, w0: &Tensor) -> lorakit::Result<(f64, f64)> {
    let w: Vec<Vec<f64>> = w.to_dtype(DType::F64)?.to_vec2()?;
    let w0: Vec<Vec<f64>> = w0.to_dtype(DType::F64)?.to_vec2()?;
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (mut dm, mut dd) = (0.0, 0.0);
    for (row, row0) in w.iter().zip(&w0) {
        let (n, n0) = (norm(row), norm(row0));
        let dot: f64 = row.iter().zip(row0).map(|(a, b)| a * b).sum();
        dm += (n - n0).abs();
        dd += 1.0 - dot / (n * n0).max(1e-30);
    }
    let rows = w.len().max(1) as f64;
    Ok((dm / rows, dd / rows))
}

fn pearson(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let cov: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let vx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let vy: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    cov / (vx * vy).sqrt().max(1e-300)
}

/// Trains `method` on task B, returning (ΔD, ΔM, checkpoint) for every linear layer at each
/// checkpoint.
fn analyse(s: &Settings, pre: &core::Pretrained, method: Method) -> lorakit::Result<Vec<Point>> {
    let dev = Device::Cpu;
    let mut prepared = method.prepare(s, pre)?;
    let paths = linear_paths(&s.model);
    let mut rng = SeededRng::new(s.seed + 10);
    let every = (s.adapt_steps / CHECKPOINTS).max(1);
    let mut points = Vec::new();
    println!("{}: {} steps", method.name(), s.adapt_steps);
    for step in 1..=s.adapt_steps {
        let b = batch(Task::Reverse, s.batch, &mut rng, &dev)?;
        let loss = prepared.model.loss(&b.inputs, &b.targets)?;
        prepared.trainer.step(&prepared.model, &loss, step, &b)?;
        if step % every == 0 {
            for (path, _, _) in &paths {
                let w0 = pre.tensors.get(&format!("{path}.weight")).ok_or_else(|| {
                    lorakit::Error::MissingKey {
                        key: format!("{path}.weight"),
                        file: "pretrained tensors".into(),
                    }
                })?;
                let w = prepared.effective_weight(path)?;
                let (dm, dd) = magnitude_direction_change(&w, w0)?;
                points.push((dd, dm, step / every));
            }
        }
    }
    Ok(points)
}

/// (ΔD, ΔM, checkpoint index) of one layer at one checkpoint.
type Point = (f64, f64, usize);

fn scatter_svg(panels: &[(Method, Vec<Point>)]) -> String {
    let (pw, ph, pad) = (260.0, 240.0, 50.0);
    let w = panels.len() as f64 * (pw + pad) + pad;
    let h = ph + 2.0 * pad;
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (k, (method, pts)) in panels.iter().enumerate() {
        let x0 = pad + k as f64 * (pw + pad);
        let (xmax, ymax) = pts
            .iter()
            .fold((1e-12f64, 1e-12f64), |(a, b), p| (a.max(p.0), b.max(p.1)));
        s += &format!(
            "<rect x=\"{x0}\" y=\"{pad}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#888\"/>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{} (r = {:.2})</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">ΔD (max {:.2e})</text>\n<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 {} {})\">ΔM (max {:.2e})</text>\n",
            x0 + pw / 2.0, pad - 10.0, method.name(), pearson(&pts.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>()),
            x0 + pw / 2.0, pad + ph + 30.0, xmax,
            x0 - 12.0, pad + ph / 2.0, x0 - 12.0, pad + ph / 2.0, ymax
        );
        for (dd, dm, ckpt) in pts {
            let cx = x0 + pw * dd / xmax * 0.95;
            let cy = pad + ph - ph * dm / ymax * 0.95;
            let color = colors[(ckpt.saturating_sub(1)) % colors.len()];
            s += &format!("<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"3\" fill=\"{color}\"/>\n");
        }
    }
    s += &format!(
        "<text x=\"{pad}\" y=\"{}\">colour = checkpoint (blue first, red last)</text>\n",
        h - 8.0
    );
    s + "</svg>\n"
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let quick = std::env::args().any(|a| a == "--quick");
    let s = if quick {
        Settings::quick(0)
    } else {
        Settings::full(0)
    };
    let pre = pretrain(&s, &mut Quiet)?;
    let mut panels = Vec::new();
    for method in Method::DORA_ANALYSIS {
        let pts = analyse(&s, &pre, method)?;
        let r = pearson(&pts.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>());
        println!(
            "{:<18} correlation(ΔD, ΔM) = {r:+.3} over {} points",
            method.name(),
            pts.len()
        );
        panels.push((method, pts));
    }
    let out = std::path::Path::new("target/dora_analysis");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("dora_analysis.svg"), scatter_svg(&panels))?;
    println!("wrote {}/dora_analysis.svg", out.display());
    Ok(())
}

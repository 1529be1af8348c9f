//! AdaLoRA's rank allocation on a small transformer-like model, drawn as the paper's
//! rank-per-layer-and-module figure.
//!
//! A frozen 6-block model (single-head attention `q k v o` and an MLP `fc1 fc2`) is adapted
//! with AdaLoRA on all 36 linear layers (`init_r` 8, average `target_r` 2) and trained to
//! match a teacher: the same model plus a planted low-rank change per layer whose rank grows
//! with depth and is largest in the MLP. The allocator only sees gradients; the picture
//! shows the planted ranks next to the ranks it kept.
//!
//! Run: `cargo run --release --example adalora_ranks [-- out.svg]`
//! (writes `target/adalora_ranks.svg` by default).

// clippy.toml keeps the library on `crate::matmul`; code outside it may call candle's own.
#![allow(clippy::disallowed_methods)]

use std::fmt::Write as _;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::train::{train_step, RankAllocator, RankAllocatorConfig};
use lorakit::{AdaLoraConfig, AdaLoraLinear, Adapter, FrozenLinear, Shared};

const LAYERS: usize = 6;
const MODULES: [&str; 6] = ["q", "k", "v", "o", "fc1", "fc2"];
const D_MODEL: usize = 32;
const D_FF: usize = 64;
const SEQ: usize = 8;
const BATCH: usize = 16;
const INIT_R: usize = 8;
const TARGET_R: usize = 2;
const STEPS: usize = 900;

/// `(d_in, d_out)` of a module.
fn dims(module: usize) -> (usize, usize) {
    match module {
        4 => (D_MODEL, D_FF),
        5 => (D_FF, D_MODEL),
        _ => (D_MODEL, D_MODEL),
    }
}

/// The rank of the teacher's planted change: grows with depth, largest in the MLP.
fn planted_rank(layer: usize, module: usize) -> usize {
    match module {
        0 | 1 => usize::from(layer >= 3),
        2 | 3 => 1 + layer / 2,
        _ => 1 + layer,
    }
}

fn rms_norm(h: &Tensor) -> candle_core::Result<Tensor> {
    let ms = h.sqr()?.mean_keepdim(D::Minus1)?;
    h.broadcast_div(&(ms + 1e-6)?.sqrt()?)
}

/// One forward of the 6-block model; `lin(layer, module, x)` applies a linear.
fn forward(
    x: &Tensor,
    lin: &dyn Fn(usize, usize, &Tensor) -> lorakit::Result<Tensor>,
) -> lorakit::Result<Tensor> {
    let mut h = x.clone();
    for l in 0..LAYERS {
        let n = rms_norm(&h)?;
        let (q, k, v) = (lin(l, 0, &n)?, lin(l, 1, &n)?, lin(l, 2, &n)?);
        let att = (q.matmul(&k.transpose(1, 2)?)? / (D_MODEL as f64).sqrt())?;
        // candle-nn's fused `softmax_last_dim` has no backward: training through it would
        // give q and k no gradient. The composed softmax has one.
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        h = (h + lin(l, 3, &att.matmul(&v)?)?)?;
        let n = rms_norm(&h)?;
        h = (&h + lin(l, 5, &lin(l, 4, &n)?.gelu()?)?)?;
    }
    Ok(h)
}

fn main() -> lorakit::Result<()> {
    let start = std::time::Instant::now();
    let dev = Device::Cpu;
    let mut rng = SeededRng::new(2023);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);

    let mut student: Vec<Vec<Shared<AdaLoraLinear>>> = Vec::new();
    let mut teacher: Vec<Vec<FrozenLinear>> = Vec::new();
    let cfg = AdaLoraConfig::new(INIT_R, 16.0);
    for l in 0..LAYERS {
        let (mut s_row, mut t_row) = (Vec::new(), Vec::new());
        for (m, name) in MODULES.iter().enumerate() {
            let (d_in, d_out) = dims(m);
            let w = rng.normal(
                (d_out, d_in),
                0.0,
                0.5 / (d_in as f64).sqrt(),
                DType::F32,
                &dev,
            )?;
            let base = FrozenLinear::new(w.clone(), None)?;
            let r = planted_rank(l, m);
            let w_t = if r == 0 {
                w
            } else {
                let u = rng.normal((d_out, r), 0.0, 1.0, DType::F32, &dev)?;
                let v = rng.normal((r, d_in), 0.0, 1.0, DType::F32, &dev)?;
                (w + (u.matmul(&v)? * (0.6 / (d_in as f64).sqrt()))?)?
            };
            t_row.push(FrozenLinear::new(w_t, None)?);
            let path = format!("layers.{l}.{name}");
            s_row.push(Shared::new(AdaLoraLinear::new(base, &cfg, vb.pp(path))?));
        }
        student.push(s_row);
        teacher.push(t_row);
    }

    let all: Vec<Shared<dyn Adapter>> = student
        .iter()
        .flatten()
        .map(|l| l.clone().erase())
        .collect();
    let mut config = RankAllocatorConfig::new(STEPS);
    (config.target_r, config.tinit, config.tfinal, config.delta_t) = (TARGET_R, 200, 200, 10);
    config.orth_reg_weight = 0.1;
    let mut alloc = RankAllocator::new(&all, config)?;
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;

    let s_lin = |l: usize, m: usize, x: &Tensor| student[l][m].read().forward_t(x, true);
    let t_lin = |l: usize, m: usize, x: &Tensor| teacher[l][m].forward_checked("teacher", x);
    for step in 1..=STEPS {
        let x = rng.normal((BATCH, SEQ, D_MODEL), 0.0, 1.0, DType::F32, &dev)?;
        let target = forward(&x, &t_lin)?.detach();
        let mse = (forward(&x, &s_lin)? - target)?.sqr()?.mean_all()?;
        let loss = (&mse + alloc.orthogonality_penalty()?)?;
        train_step(&loss, &mut opt, &mut [&mut alloc], step)?;
        if step % 50 == 0 || step == 1 {
            println!(
                "step {step:4}  mse {:.5}  budget {}",
                mse.to_scalar::<f32>()?,
                alloc.budget()
            );
        }
    }

    let ranks: Vec<Vec<usize>> = student
        .iter()
        .map(|row| row.iter().map(|l| l.read().kept_rank()).collect())
        .collect();
    let planted: Vec<Vec<usize>> = (0..LAYERS)
        .map(|l| (0..MODULES.len()).map(|m| planted_rank(l, m)).collect())
        .collect();
    println!("\nfinal rank (planted) per module × layer:");
    for (m, name) in MODULES.iter().enumerate() {
        let cells: Vec<String> = (0..LAYERS)
            .map(|l| format!("{} ({})", ranks[l][m], planted[l][m]))
            .collect();
        println!("{name:>4}: {}", cells.join("  "));
    }
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/adalora_ranks.svg".to_string());
    let svg = svg_figure(&[("planted rank", &planted), ("AdaLoRA final rank", &ranks)]);
    std::fs::write(&out, svg).map_err(|e| lorakit::Error::io(&out, e))?;
    println!(
        "kept {} of {} ranks; wrote {out} in {:.1}s",
        ranks.iter().flatten().sum::<usize>(),
        alloc.init_budget(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Side-by-side heatmaps (rows: modules, columns: layers), hand-written SVG.
fn svg_figure(panels: &[(&str, &Vec<Vec<usize>>)]) -> String {
    let (cell, left, top, gap) = (44.0, 56.0, 54.0, 60.0);
    let panel_w = cell * LAYERS as f64;
    let width = left + panels.len() as f64 * (panel_w + gap);
    let height = top + cell * MODULES.len() as f64 + 50.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (p, (title, grid)) in panels.iter().enumerate() {
        let x0 = left + p as f64 * (panel_w + gap);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="15">{title}</text>"#,
            x0 + panel_w / 2.0,
            top - 28.0
        );
        for (m, name) in MODULES.iter().enumerate() {
            let y = top + m as f64 * cell;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{name}</text>"#,
                x0 - 8.0,
                y + cell / 2.0 + 4.0
            );
            for l in 0..LAYERS {
                let r = grid.get(l).and_then(|row| row.get(m)).copied().unwrap_or(0);
                let t = r as f64 / INIT_R as f64;
                // White → dark green.
                let c = |lo: f64, hi: f64| (lo + (hi - lo) * t).round() as u8;
                let (rr, gg, bb) = (c(255.0, 0.0), c(255.0, 90.0), c(255.0, 50.0));
                let x = x0 + l as f64 * cell;
                let _ = writeln!(
                    s,
                    r##"<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="#{rr:02x}{gg:02x}{bb:02x}" stroke="#888"/>"##
                );
                let fg = if t > 0.5 { "white" } else { "black" };
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle" fill="{fg}">{r}</text>"#,
                    x + cell / 2.0,
                    y + cell / 2.0 + 5.0
                );
            }
        }
        for l in 0..LAYERS {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                x0 + (l as f64 + 0.5) * cell,
                top + cell * MODULES.len() as f64 + 18.0,
                l + 1
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">layer</text>"#,
            x0 + panel_w / 2.0,
            top + cell * MODULES.len() as f64 + 38.0
        );
    }
    s.push_str("</svg>\n");
    s
}

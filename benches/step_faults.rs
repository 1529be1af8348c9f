//! Minor page faults and wall time per LoRA training step in a fresh process: the fused
//! forward, `sum`, backward (`dx`, `dA`, `dB`) and an AdamW update of `A` and `B`, f32,
//! n = 512, r = 16, d = 1024 and 2048, steps 1..30.
//!
//! `cargo bench --bench step_faults` runs each case in a fresh child process (itself,
//! with `--case D MODE`), once as is (`default`) and once after
//! `lorakit::memory::retain_freed_buffers()` (`retain`), and prints one JSON object on its
//! last line: per case, `faults` and `ms` for each step, `first` (step 1), `first5` (mean
//! of steps 1..5) and `steady` / `steady_ms` (medians of steps 11..30). Faults are
//! `minflt` of `/proc/self/stat` (all threads), so the counts are Linux-only (`null`
//! elsewhere). `RAYON_NUM_THREADS` sets the thread count, as for `compare_json`. The steps
//! run on one of rayon's workers (`lorakit::threads::on_worker`), as a training loop does.

use std::process::Command;
use std::time::Instant;

use candle_nn::{AdamW, Optimizer, ParamsAdamW};

#[allow(dead_code)]
mod common;
use common::{Path, Setup, Shape};

const STEPS: usize = 30;
const DIMS: [usize; 2] = [1024, 2048];
const MODES: [&str; 2] = ["default", "retain"];

/// The process's minor page faults so far (`/proc/self/stat`, field 10).
fn minor_faults() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    after_name.split_whitespace().nth(7)?.parse().ok()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One case in this process: the JSON value of `{"faults": [...], "ms": [...], ...}`.
fn run_case(d: usize, mode: &str) -> String {
    if mode == "retain" {
        assert!(lorakit::memory::retain_freed_buffers() || !cfg!(target_os = "linux"));
    }
    let setup = Setup::new(Shape { n: 512, d, r: 16 });
    let mut opt = AdamW::new(
        vec![setup.la.clone(), setup.lb.clone()],
        ParamsAdamW {
            lr: 1e-4,
            ..ParamsAdamW::default()
        },
    )
    .unwrap();
    let (mut faults, mut ms) = (Vec::new(), Vec::new());
    // The steps on one of rayon's workers, as a training loop runs (`threads::on_worker`).
    lorakit::threads::on_worker(|| steps(&setup, &mut opt, &mut faults, &mut ms));
    summary(faults, ms)
}

/// `STEPS` training steps, recording each one's minor page faults and wall time.
fn steps(setup: &Setup, opt: &mut AdamW, faults: &mut Vec<Option<f64>>, ms: &mut Vec<f64>) {
    for _ in 0..STEPS {
        let f0 = minor_faults();
        let t = Instant::now();
        let y = setup.forward(Path::Fused);
        let grads = y.sum_all().unwrap().backward().unwrap();
        opt.step(&grads).unwrap();
        drop((y, grads));
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        faults.push(f0.zip(minor_faults()).map(|(a, b)| (b - a) as f64));
    }
}

/// The case's JSON value from its steps' faults and times.
fn summary(faults: Vec<Option<f64>>, ms: Vec<f64>) -> String {
    let faults: Option<Vec<f64>> = faults.into_iter().collect();
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let fault_fields = match &faults {
        Some(f) => format!(
            "\"faults\": [{}], \"first\": {}, \"first5\": {:.1}, \"steady\": {}",
            list(f),
            f[0],
            f[..5].iter().sum::<f64>() / 5.0,
            median(&f[10..])
        ),
        None => "\"faults\": null, \"first\": null, \"first5\": null, \"steady\": null".into(),
    };
    format!(
        "{{{fault_fields}, \"ms\": [{}], \"first_ms\": {:.3}, \"steady_ms\": {:.3}}}",
        list(&ms),
        ms[0],
        median(&ms[10..])
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let d: usize = args[i + 1].parse().unwrap();
        println!("{}", run_case(d, &args[i + 2]));
        return;
    }
    // `cargo bench` passes `--bench`: run every case in a fresh process.
    let exe = std::env::current_exe().unwrap();
    let mut out = Vec::new();
    for d in DIMS {
        for mode in MODES {
            let child = Command::new(&exe)
                .args(["--case", &d.to_string(), mode])
                .output()
                .unwrap();
            assert!(child.status.success(), "{child:?}");
            let stdout = String::from_utf8(child.stdout).unwrap();
            let line = stdout.trim().lines().last().unwrap().to_string();
            out.push(format!("\"step_faults/n512_d{d}_r16/{mode}\": {line}"));
        }
    }
    println!("{{{}}}", out.join(", "));
}

//! The cases of `fused.rs` and of `variants.rs` timed with a plain loop, for
//! `benches/peft_compare.py`.
//!
//! `cargo bench --bench compare_json` (the script sets `RAYON_NUM_THREADS`) times every case
//! in turn and prints them as one JSON object, `{"case": [median_ms, min_ms], ...}`, on its
//! last line. `cargo bench --bench compare_json -- --serve` sets the cases up, prints their
//! names as a JSON list on one line, and then times the case named on each line of its
//! standard input, answering with one line `{"case": [median_ms, min_ms]}`, until its
//! input ends: the script's paired rounds, which time each group of cases on PEFT's side
//! and then on lorakit's, so that both meet about the same moments of a shared host. A
//! request `case share` (a share in (0, 1] of the case's time budget) is answered with
//! the calls' own times instead, `{"case": [ms, ms, ...]}`, from a [`Portion`] of the
//! budget: the script's chunked rounds (`--chunks`), whose sides take turns more often.
//!
//! Like a training program, it first calls `lorakit::threads::park_idle_elementwise_workers`
//! (candle's element-wise workers spin 200 rounds after an op instead of 25,000); a
//! `CANDLE_BARRIER_POOL_SPIN_LIMIT` set by the caller is kept; and it times every case on
//! one of rayon's worker threads (`lorakit::threads::on_worker`, as a training or decoding
//! loop should run).
//!
//! The forward rows of the small batches (`n ≤ common::EVAL_MAX_ROWS`) time evaluation: an input
//! without gradient tracking and, for the fused path, `LoraLinear::forward_t(x, false)`
//! (PEFT's side runs under `torch.no_grad()`).

use std::io::{BufRead, Write};
use std::time::Instant;

mod common;
mod variant_cases;
use common::{Path, Setup, SHAPES};
use variant_cases::{EvalCases, TrainCases, EVAL, TRAIN};

/// How much of a case's time budget one request takes, and the calls around it: the whole
/// budget after 3 warm-up calls, at least 5 and at most 200 timed calls; or a share of it
/// after one warm-up call, at least 2 and at most that share of the 200, rounded up (as
/// `peft_compare.py`'s `Portion`, which times PEFT's side the same way).
#[derive(Clone, Copy)]
struct Portion {
    share: f64,
    warmup: usize,
    least: usize,
    most: usize,
}

impl Portion {
    const WHOLE: Portion = Portion {
        share: 1.0,
        warmup: 3,
        least: 5,
        most: 200,
    };

    /// A share in (0, 1] of the budget, or `None` for anything else.
    fn of(share: f64) -> Option<Portion> {
        (share > 0.0 && share <= 1.0).then(|| Portion {
            share,
            warmup: 1,
            least: 2,
            most: ((200.0 * share).ceil() as usize).max(2),
        })
    }
}

/// The wall times of `f`'s calls in milliseconds, after warm-up, over about `portion` of
/// `budget_ms`.
fn call_times(f: &mut dyn FnMut(), budget_ms: f64, portion: Portion) -> Vec<f64> {
    for _ in 0..portion.warmup {
        f();
    }
    let budget_ms = budget_ms * portion.share;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < portion.least
        || (start.elapsed().as_secs_f64() * 1e3 < budget_ms && times.len() < portion.most)
    {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times
}

/// Median and minimum wall time of `f` in milliseconds, after warm-up, over about
/// `budget_ms`.
fn median_ms(f: &mut dyn FnMut(), budget_ms: f64) -> (f64, f64) {
    let mut times = call_times(f, budget_ms, Portion::WHOLE);
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times[0])
}

/// One timed case: its name in the JSON, its time budget and what one call does.
struct Case<'a> {
    name: String,
    budget_ms: f64,
    call: Box<dyn FnMut() + 'a>,
}

impl Case<'_> {
    /// `"name": [median, min]`, timed now.
    fn time(&mut self) -> String {
        let (median, min) = median_ms(&mut self.call, self.budget_ms);
        format!("\"{}\": [{median:.4}, {min:.4}]", self.name)
    }

    /// `"name": [ms, ms, ...]`, each call's time over `portion` of the budget, timed now.
    fn time_calls(&mut self, portion: Portion) -> String {
        let times = call_times(&mut self.call, self.budget_ms, portion);
        let times: Vec<String> = times.iter().map(|t| format!("{t:.4}")).collect();
        format!("\"{}\": [{}]", self.name, times.join(", "))
    }
}

/// What the cases run on, set up once.
struct Setups {
    shapes: Vec<Setup>,
    train: TrainCases,
    eval: EvalCases,
}

impl Setups {
    fn new() -> Self {
        Setups {
            shapes: SHAPES.into_iter().map(Setup::new).collect(),
            train: TrainCases::new(),
            eval: EvalCases::new(),
        }
    }

    /// Every case, in the order of the one-shot JSON.
    fn cases(&self) -> Vec<Case<'_>> {
        let mut cases = Vec::new();
        for (s, setup) in SHAPES.iter().zip(&self.shapes) {
            let label = format!("n{}_d{}_r{}", s.n, s.d, s.r);
            for path in Path::ALL {
                cases.push(Case {
                    name: format!("fwd/{label}/{}", path.name()),
                    budget_ms: 1500.0,
                    call: Box::new(move || drop(std::hint::black_box(setup.fwd_row(path)))),
                });
                cases.push(Case {
                    name: format!("fwd_bwd/{label}/{}", path.name()),
                    budget_ms: 2500.0,
                    call: Box::new(move || {
                        std::hint::black_box(setup.forward_backward(path));
                    }),
                });
            }
        }
        let (n, d, _) = TRAIN;
        for (name, layer) in &self.train.layers {
            cases.push(Case {
                name: format!("variants/fwd_bwd_n{n}_d{d}/{name}"),
                budget_ms: 2500.0,
                call: Box::new(|| self.train.step(layer.as_ref())),
            });
        }
        let (d, _) = EVAL;
        cases.push(Case {
            name: format!("variants/eval_n1_d{d}/base"),
            budget_ms: 1500.0,
            call: Box::new(|| self.eval.base()),
        });
        for (name, layer) in &self.eval.layers {
            cases.push(Case {
                name: format!("variants/eval_n1_d{d}/{name}"),
                budget_ms: 1500.0,
                call: Box::new(|| self.eval.eval(layer.as_ref())),
            });
        }
        cases
    }
}

fn main() {
    // `cargo bench` passes `--bench`; `--serve` is the only other argument.
    let serve = std::env::args().any(|a| a == "--serve");
    lorakit::threads::park_idle_elementwise_workers();
    lorakit::threads::on_worker(|| if serve { serve_cases() } else { time_all() });
}

/// What the kernels route by, for `peft_compare.py`'s machine line.
fn print_kernels() {
    println!(
        "lorakit kernels: {}",
        lorakit::kernels::CpuReport::current()
    );
}

/// Every case in turn, as one JSON object on the last line.
fn time_all() {
    print_kernels();
    let setups = Setups::new();
    let timed: Vec<String> = setups.cases().iter_mut().map(Case::time).collect();
    println!("{{{}}}", timed.join(", "));
}

/// The names as a JSON list, then one case per line of standard input, each answered on
/// its own line (`--serve`): a name alone with its median and minimum, a name and a share
/// of its budget with its calls' times (a space between them; no case's name has one). An
/// unknown name or a share outside (0, 1] is answered `{"error": ...}`.
fn serve_cases() {
    print_kernels();
    let setups = Setups::new();
    let mut cases = setups.cases();
    let names: Vec<String> = cases.iter().map(|c| format!("\"{}\"", c.name)).collect();
    let mut out = std::io::stdout().lock();
    let mut answer = |line: String| writeln!(out, "{line}").and_then(|()| out.flush()).is_ok();
    if !answer(format!("[{}]", names.join(", "))) {
        return;
    }
    for request in std::io::stdin().lock().lines() {
        let Ok(request) = request else { return };
        let (name, share) = match request.trim().split_once(' ') {
            Some((name, share)) => (name, Some(share.trim())),
            None => (request.trim(), None),
        };
        let portion = share.map(|s| (s, s.parse().ok().and_then(Portion::of)));
        let line = match (cases.iter_mut().find(|c| c.name == name), portion) {
            (Some(case), None) => format!("{{{}}}", case.time()),
            (Some(case), Some((_, Some(portion)))) => format!("{{{}}}", case.time_calls(portion)),
            (Some(_), Some((share, None))) => error_line(format!(
                "{share:?}: the share of the budget must be a number in (0, 1]"
            )),
            (None, _) => error_line(format!("no case named {name:?}")),
        };
        if !answer(line) {
            return;
        }
    }
}

/// A request's error as its answer line.
fn error_line(error: String) -> String {
    format!("{{\"error\": {}}}", serde_json::Value::from(error))
}

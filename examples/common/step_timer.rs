//! What the training-step timers (`gpt2_speed`, `bert_speed`) share: their flags, the
//! thread setup both sides of a comparison run under, the inputs and optimizer the Python
//! side builds too (`benches/step_compare.py`'s scripts), and the timed loop.

use candle_core::{Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

/// AdamW at lr 1e-4, the rest PyTorch's defaults (`torch.optim.AdamW(params, lr=1e-4)`).
pub fn adamw(vars: Vec<Var>) -> candle_core::Result<AdamW> {
    let params = ParamsAdamW {
        lr: 1e-4,
        ..Default::default()
    };
    AdamW::new(vars, params)
}

/// The token ids both sides use: `i * 7919 % vocab` for `i` in `0..batch * seq`, as
/// `(batch, seq)`.
pub fn ids(batch: usize, seq: usize, vocab: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let ids: Vec<u32> = (0..(batch * seq) as u32)
        .map(|i| i * 7919 % vocab as u32)
        .collect();
    Tensor::from_vec(ids, (batch, seq), dev)
}

/// The flags of a step timer.
pub struct StepArgs {
    pub model_dir: String,
    pub steps: usize,
    pub warmup: usize,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
}

impl StepArgs {
    /// Parses `--model DIR [--steps N] [--warmup N] [--batch N] [--seq N] [--threads N]`
    /// with the given default batch and sequence length.
    pub fn parse(batch: usize, seq: usize) -> Result<Self, Box<dyn std::error::Error>> {
        let mut a = StepArgs {
            model_dir: String::new(),
            steps: 12,
            warmup: 2,
            batch,
            seq,
            threads: 2,
        };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args.next().ok_or(format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--model" => a.model_dir = value,
                "--steps" => a.steps = value.parse()?,
                "--warmup" => a.warmup = value.parse()?,
                "--batch" => a.batch = value.parse()?,
                "--seq" => a.seq = value.parse()?,
                "--threads" => a.threads = value.parse()?,
                _ => return Err(format!("unknown flag {flag}").into()),
            }
        }
        if a.model_dir.is_empty() {
            return Err("--model <model folder> is required".into());
        }
        if a.steps == 0 || a.batch == 0 || a.seq < 2 {
            return Err("--steps, --batch ≥ 1 and --seq ≥ 2".into());
        }
        Ok(a)
    }

    /// Sets the thread count before any candle op (candle reads `RAYON_NUM_THREADS` for its
    /// gemm calls and `CANDLE_NUM_THREADS` for its element-wise pool), builds rayon's pool,
    /// and turns on what a training program should
    /// (`park_idle_elementwise_workers`, `retain_freed_buffers`).
    pub fn set_up_threads(&self) -> Result<(), Box<dyn std::error::Error>> {
        // Before any thread starts: a thread that has allocated keeps its own arena.
        lorakit::memory::retain_freed_buffers();
        std::env::set_var("RAYON_NUM_THREADS", self.threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", self.threads.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(self.threads)
            .build_global()?;
        lorakit::threads::park_idle_elementwise_workers();
        Ok(())
    }

    /// Runs `step` `warmup + steps` times on one of rayon's workers (as
    /// `lorakit::threads::on_worker` advises) and prints the median and minimum ms of the
    /// timed steps as one JSON line.
    pub fn time_steps(
        &self,
        mut step: impl FnMut() -> candle_core::Result<()> + Send,
    ) -> candle_core::Result<()> {
        let (warmup, steps) = (self.warmup, self.steps);
        let mut times = lorakit::threads::on_worker(|| -> candle_core::Result<Vec<f64>> {
            let mut times = Vec::new();
            for i in 0..warmup + steps {
                let t = std::time::Instant::now();
                step()?;
                if i >= warmup {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            Ok(times)
        })?;
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{{\"step_ms_median\": {:.2}, \"step_ms_min\": {:.2}, \"steps\": {steps}, \"threads\": {}}}",
            times[times.len() / 2],
            times[0],
            self.threads
        );
        Ok(())
    }
}

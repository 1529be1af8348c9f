//! Speed of LoRA fine-tuning a GPT-2 model folder, the lorakit side of
//! `benches/gpt2_compare.py` (which writes the folder with transformers and times
//! transformers + PEFT on it too).
//!
//! Per step, at the level a user calls: `Gpt2LmHeadModel::loss_sum` over random ids
//! `(batch, seq)` divided by the predicted positions (transformers' `model(input_ids,
//! labels=ids).loss`), `backward`, one `candle_nn::AdamW` step over a fresh LoRA (r = 16,
//! alpha = 32, no dropout) on `c_attn`, `c_proj` and `c_fc`. Prints the median and the
//! minimum step time over the timed steps.
//!
//! ```text
//! cargo run --release --example gpt2_speed -- --model <gpt2 folder> [--steps 12]
//!     [--warmup 2] [--batch 4] [--seq 256] [--threads 2]
//! ```

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::models::gpt2::Gpt2LmHeadModel;
use lorakit::LoraConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut model_dir, mut steps, mut warmup, mut batch, mut seq, mut threads) =
        (None, 12usize, 2usize, 4usize, 256usize, 2usize);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => model_dir = Some(value),
            "--steps" => steps = value.parse()?,
            "--warmup" => warmup = value.parse()?,
            "--batch" => batch = value.parse()?,
            "--seq" => seq = value.parse()?,
            "--threads" => threads = value.parse()?,
            _ => return Err(format!("unknown flag {flag}").into()),
        }
    }
    let model_dir = model_dir.ok_or("--model <gpt2 folder> is required")?;
    if steps == 0 || batch == 0 || seq < 2 {
        return Err("--steps, --batch ≥ 1 and --seq ≥ 2".into());
    }
    // Before any candle op: candle reads these for its gemm calls and element-wise pool.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    lorakit::threads::park_idle_elementwise_workers();
    lorakit::memory::retain_freed_buffers();

    let dev = Device::Cpu;
    let map = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(["c_attn", "c_proj", "c_fc"])),
        RankAlpha::new(16, 32.0),
        LoraConfig::new(16, 32.0),
        VarBuilder::from_varmap(&map, DType::F32, &dev),
    );
    let model = Gpt2LmHeadModel::from_pretrained(&model_dir, DType::F32, &dev, &plan)?;
    let adapter = plan.finish()?;
    adapter.set_training(true);
    let params = ParamsAdamW {
        lr: 1e-4,
        ..Default::default()
    };
    let mut opt = AdamW::new(adapter.vars(), params)?;
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..(batch * seq) as u32)
        .map(|i| i * 7919 % vocab)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &dev)?;
    let mask = Tensor::ones((batch, seq), DType::F32, &dev)?;
    let predicted = (batch * (seq - 1)) as f64;
    // The training loop on one of rayon's workers, as `lorakit::threads::on_worker` advises.
    let mut times = lorakit::threads::on_worker(|| -> candle_core::Result<Vec<f64>> {
        let mut times = Vec::new();
        for step in 0..warmup + steps {
            let t = std::time::Instant::now();
            let loss = (model
                .loss_sum(&ids, &mask)
                .map_err(candle_core::Error::wrap)?
                / predicted)?;
            let grads = loss.backward()?;
            opt.step(&grads)?;
            if step >= warmup {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(times)
    })?;
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"step_ms_median\": {:.2}, \"step_ms_min\": {:.2}, \"steps\": {steps}, \"threads\": {threads}}}",
        times[times.len() / 2],
        times[0]
    );
    Ok(())
}

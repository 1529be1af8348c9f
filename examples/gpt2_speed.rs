//! Speed of LoRA fine-tuning a GPT-2 model folder, the lorakit side of
//! `benches/gpt2_compare.py` (which writes the folder with transformers and times
//! transformers + PEFT on it too).
//!
//! Per step, at the level a user calls: `Gpt2LmHeadModel::loss_sum_t` in training mode
//! (the config's own dropouts, as PyTorch's side after `model.train()`) over random ids
//! `(batch, seq)` divided by the predicted positions (transformers' `model(input_ids,
//! labels=ids).loss`), `backward`, one `candle_nn::AdamW` step over a fresh LoRA (r = 16,
//! alpha = 32, no LoRA dropout) on `c_attn`, `c_proj` and `c_fc`. Prints the median and
//! the minimum step time over the timed steps.
//!
//! ```text
//! cargo run --release --example gpt2_speed -- --model <gpt2 folder> [--steps 12]
//!     [--warmup 2] [--batch 4] [--seq 256] [--threads 2]
//! ```

#[path = "common/step_timer.rs"]
mod step_timer;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::models::gpt2::Gpt2LmHeadModel;
use lorakit::LoraConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = step_timer::StepArgs::parse(4, 256)?;
    args.set_up_threads()?;
    let (batch, seq) = (args.batch, args.seq);

    let dev = Device::Cpu;
    let map = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(["c_attn", "c_proj", "c_fc"])),
        RankAlpha::new(16, 32.0),
        LoraConfig::new(16, 32.0),
        VarBuilder::from_varmap(&map, DType::F32, &dev),
    );
    let model = Gpt2LmHeadModel::from_pretrained(&args.model_dir, DType::F32, &dev, &plan)?;
    let adapter = plan.finish()?;
    adapter.set_training(true);
    let mut opt = step_timer::adamw(adapter.vars())?;
    let ids = step_timer::ids(batch, seq, model.config().vocab_size, &dev)?;
    let mask = Tensor::ones((batch, seq), DType::F32, &dev)?;
    let predicted = (batch * (seq - 1)) as f64;
    args.time_steps(|| {
        let loss = (model
            .loss_sum_t(&ids, &mask, true)
            .map_err(candle_core::Error::wrap)?
            / predicted)?;
        opt.step(&loss.backward()?)
    })?;
    Ok(())
}

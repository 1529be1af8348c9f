//! Speed of LoRA fine-tuning a BERT-family (BERT, RoBERTa, DistilBERT) sequence classifier folder, the lorakit side of
//! `benches/bert_compare.py` (which writes the folder with transformers and times
//! transformers + PEFT on it too).
//!
//! Per step, at the level a user calls, in training mode (the config's dropout):
//! `BertForSequenceClassification::forward_t` on random ids `(batch, seq)` with an
//! attention mask that pads each row's tail to a length of its own, `loss` (cross-entropy
//! against random labels, as transformers' `model(..., labels=labels).loss`), `backward`,
//! one `candle_nn::AdamW` step over a fresh LoRA (r = 16, alpha = 32, no dropout) on
//! `query` and `value` (DistilBERT's `q_lin`, `v_lin`) and a trainable copy of
//! `classifier` (PEFT's `SEQ_CLS` task; DistilBERT's `pre_classifier` too).
//! Prints the median and the minimum step time over the timed steps.
//!
//! ```text
//! cargo run --release --example bert_speed -- --model <bert folder> [--steps 12]
//!     [--warmup 2] [--batch 16] [--seq 128] [--threads 2]
//! ```

#[path = "common/step_timer.rs"]
mod step_timer;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use lorakit::model::{AdapterPlan, ModuleSelector, RankAlpha, TargetSpec};
use lorakit::models::bert::{BertConfig, BertForSequenceClassification};
use lorakit::LoraConfig;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = step_timer::StepArgs::parse(16, 128)?;
    args.set_up_threads()?;
    let (batch, seq) = (args.batch, args.seq);

    let dev = Device::Cpu;
    let config = BertConfig::from_file(format!("{}/config.json", args.model_dir))?;
    let map = VarMap::new();
    let plan = AdapterPlan::lora(
        TargetSpec::new(ModuleSelector::list(config.family.default_targets()))
            .modules_to_save(["classifier"]),
        RankAlpha::new(16, 32.0),
        LoraConfig::new(16, 32.0),
        VarBuilder::from_varmap(&map, DType::F32, &dev),
    );
    let model = BertForSequenceClassification::from_pretrained_with(
        &args.model_dir,
        &config,
        DType::F32,
        &dev,
        &plan,
    )?;
    let adapter = plan.finish()?;
    adapter.set_training(true);
    let mut opt = step_timer::adamw(adapter.vars())?;
    let ids = step_timer::ids(batch, seq, config.vocab_size, &dev)?;
    // Row r keeps seq - (r * 7 % (seq / 2)) tokens: padded tails of different lengths.
    let mask: Vec<u32> = (0..batch * seq)
        .map(|i| u32::from(i % seq < seq - (i / seq * 7) % (seq / 2)))
        .collect();
    let mask = Tensor::from_vec(mask, (batch, seq), &dev)?;
    let labels: Vec<u32> = (0..batch as u32)
        .map(|r| r % config.num_labels as u32)
        .collect();
    let labels = Tensor::from_vec(labels, batch, &dev)?;
    args.time_steps(|| {
        let logits = model
            .forward_t(&ids, None, Some(&mask), true)
            .map_err(candle_core::Error::wrap)?;
        let loss = model
            .loss(&logits, &labels)
            .map_err(candle_core::Error::wrap)?;
        opt.step(&loss.backward()?)
    })?;
    Ok(())
}

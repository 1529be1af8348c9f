//! Fine-tune a causal language model with any lorakit variant and write the adapter as a
//! PEFT directory.
//!
//! ```text
//! cargo run --release --example finetune -- --model <folder> --data <file.jsonl> \
//!     --method <variant> --out <adapter dir> [--steps N] [--lr F] [--rank R] ...
//! cargo run --release --example finetune          # the no-download demo
//! ```
//!
//! `<folder>` is a Hugging Face model folder (`config.json`, `model.safetensors` or shards,
//! `tokenizer.json`) of the Llama family (Llama, Mistral, Qwen2, Qwen3, Granite, SmolLM3,
//! Phi-3, Gemma 1–3, OLMo 2 and 3, and Gemma 3 4B+'s text decoder) or GPT-2, chosen by
//! `config.json`'s `model_type` ([`AutoCausalLm`]). The JSONL holds
//! `{"text": ...}` or `{"prompt": ..., "completion": ...}` rows (prompt tokens are not
//! trained). With no arguments, the example creates a tiny Llama model and a tokenizer
//! trained on `examples/finetune/tiny.jsonl` under `target/finetune-demo/` and fine-tunes
//! that. Writes the adapter, `loss_curve.svg` and `log.json` to `--out`.
//!
//! `--quantize nf4` (bitsandbytes' NF4, as PEFT's QLoRA recipe; or `q4k`, `q8_0`, `q4_0`,
//! `q5k`, `q6k`, …) trains QLoRA-style: every linear
//! of the decoder is quantized on load but `lm_head` and the MoE routers, and the adapter
//! trains in float over it (Delta-LoRA, which updates the frozen weight, is refused).

mod demo;
#[path = "../common/loss_plot.rs"]
mod loss_plot;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lorakit::finetune::batching::Packing;
use lorakit::finetune::{AdapterRecipe, Dataset, TrainConfig, TrainEvent, TrainReport, Trainer};
use lorakit::model::Quantize;
use lorakit::models::auto::AutoCausalLm;
use lorakit::models::CausalLm;
use lorakit::quant::{Bnb4Type, QuantFormat};
use lorakit::tokenizer::TextTokenizer;
use lorakit::Variant;

use crate::loss_plot::{loss_svg, Series};

#[derive(Parser, Debug)]
#[command(
    about = "Fine-tune a Llama-family or GPT-2 model with a lorakit adapter (no arguments: a tiny demo)"
)]
struct Args {
    /// Model folder (config.json, safetensors, tokenizer.json). Omit for the demo.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data, JSONL: {"text": ...} or {"prompt": ..., "completion": ...} per line.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The variant: lora, lora-plus, vera, lora-fa, lora-drop, adalora, dora, delta-lora.
    #[arg(long, default_value = "lora")]
    method: String,
    /// Where the adapter (a PEFT directory), loss_curve.svg and log.json go.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// Rank (VeRA: the shared pair's rank; AdaLoRA: the initial rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// LoRA alpha (default: 2 × rank).
    #[arg(long)]
    alpha: Option<f64>,
    /// Target modules, comma-separated, or all-linear.
    #[arg(long, default_value = "all-linear")]
    targets: String,
    /// Target parameters (PEFT's target_parameters; LoRA and LoRA+), comma-separated: a
    /// mixture of experts' stacked weights, e.g. gpt-oss's
    /// experts.gate_up_proj,experts.down_proj,router.weight.
    #[arg(long)]
    target_parameters: Option<String>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest sequence, in tokens (default: 256, or the model's position limit if smaller,
    /// as GPT-2's n_positions can be).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Pack examples into full rows instead of padding each batch.
    #[arg(long)]
    pack: bool,
    /// Warmup steps (default: 10% of the steps).
    #[arg(long)]
    warmup: Option<usize>,
    /// Examples held out for the eval loss.
    #[arg(long, default_value_t = 8)]
    eval_count: usize,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 25)]
    eval_every: usize,
    /// Write a checkpoint every N steps under --out.
    #[arg(long)]
    save_every: Option<usize>,
    /// Continue from a checkpoint folder that --save-every wrote.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Weights' dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Seed of the adapter's init and the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Quantize the frozen linears on load (QLoRA): nf4 or fp4 (bitsandbytes' 4-bit, as
    /// `BitsAndBytesConfig(load_in_4bit=True)` without double quantization), q4k, q5k, q6k,
    /// q8_0, q4_0, q4_1, q5_0, q5_1, q2k or q3k. `lm_head`, embeddings and norms stay float.
    #[arg(long)]
    quantize: Option<String>,
}

/// The format named by `--quantize`.
fn quantize_type(name: &str) -> lorakit::Result<QuantFormat> {
    let t = match name.to_ascii_lowercase().replace('_', "").as_str() {
        "nf4" => return Ok(Bnb4Type::Nf4.into()),
        "fp4" => return Ok(Bnb4Type::Fp4.into()),
        "q80" => GgmlDType::Q8_0,
        "q40" => GgmlDType::Q4_0,
        "q41" => GgmlDType::Q4_1,
        "q50" => GgmlDType::Q5_0,
        "q51" => GgmlDType::Q5_1,
        "q2k" => GgmlDType::Q2K,
        "q3k" => GgmlDType::Q3K,
        "q4k" => GgmlDType::Q4K,
        "q5k" => GgmlDType::Q5K,
        "q6k" => GgmlDType::Q6K,
        _ => {
            return Err(lorakit::Error::usage(
                lorakit::Scope::Settings("finetune".into()),
                format!(
                "--quantize {name}: use nf4, fp4, q4k, q5k, q6k, q8_0, q4_0, q4_1, q5_0, q5_1, q2k or q3k"
            ),
            ))
        }
    };
    Ok(t.into())
}

fn main() {
    // A training program: keep the step's freed buffers resident (see `lorakit::memory`).
    lorakit::memory::retain_freed_buffers();
    // ... and candle's element-wise workers park instead of spinning through the GEMMs
    // (see `lorakit::threads`); before any thread starts.
    lorakit::threads::park_idle_elementwise_workers();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(mut args: Args) -> lorakit::Result<()> {
    let demo = args.model.is_none() && args.data.is_none();
    if demo {
        let dir = PathBuf::from("target/finetune-demo");
        println!("No --model/--data given: the demo (a tiny Llama and a tokenizer made here).");
        let made = demo::make(&dir, Path::new("examples/finetune/tiny.jsonl"))?;
        args.model = Some(made.model);
        args.data = Some(made.data);
        args.out.get_or_insert(dir.join("adapter"));
    }
    let (Some(model_dir), Some(data_path), Some(out)) = (&args.model, &args.data, &args.out) else {
        return Err(lorakit::Error::usage(
            lorakit::Scope::Settings("finetune".into()),
            "give --model, --data and --out together (or none of them for the demo)",
        ));
    };
    let variant = Variant::from_str(&args.method)?;
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        other => {
            return Err(lorakit::Error::usage(
                lorakit::Scope::Settings("finetune".into()),
                format!("--dtype {other}: use f32, bf16 or f16"),
            ))
        }
    };
    let dev = Device::Cpu;

    let tokenizer = TextTokenizer::from_dir(model_dir)?;
    let all = Dataset::from_jsonl(data_path, &tokenizer)?;
    let (train, eval) = if args.eval_count > 0 && all.len() > args.eval_count {
        let (t, e) = all.split_eval(args.eval_count, args.seed)?;
        (t, Some(e))
    } else {
        (all, None)
    };

    let targets: Vec<&str> = args
        .targets
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let mut recipe = AdapterRecipe::new(
        variant,
        args.rank,
        args.alpha.unwrap_or(2.0 * args.rank as f64),
        &targets,
    );
    recipe.seed = args.seed;
    if let Some(names) = &args.target_parameters {
        let names = names.split(',').map(str::trim).filter(|n| !n.is_empty());
        recipe.target_parameters = names.map(str::to_string).collect();
    }
    recipe.lora_drop.stage1_steps = (args.steps / 10).max(1);
    let adapter_vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&adapter_vars, dtype, &dev);
    let shapes = AutoCausalLm::linear_shapes(model_dir)?;
    let plan = recipe.plan(vb, &shapes, dtype, &dev)?;
    let plan = match args.quantize.as_deref() {
        Some(name) => {
            let t = quantize_type(name)?;
            println!("QLoRA: the decoder's linears are quantized to {t:?} on load (lm_head and MoE routers stay {dtype:?})");
            plan.with_quantize(Quantize::new(t))
        }
        None => plan,
    };
    let model = AutoCausalLm::from_pretrained(model_dir, dtype, &dev, &plan)?;
    let adapters = plan.finish()?;
    let parameters = match &args.target_parameters {
        Some(names) => format!(" and parameters {names}"),
        None => String::new(),
    };
    println!(
        "model: {} ({}), {variant} on {}{parameters}: {}",
        model_dir.display(),
        model.model_type_name(),
        args.targets,
        adapters.param_counts()
    );

    let mut settings = TrainConfig::new(args.steps);
    settings.lr = args.lr;
    settings.seed = args.seed;
    settings.batch.batch_size = args.batch_size;
    settings.batch.seq_len = args
        .seq_len
        .unwrap_or_else(|| model.max_positions().map_or(256, |limit| limit.min(256)));
    settings.batch.packing = if args.pack {
        Packing::Pack
    } else {
        Packing::Pad
    };
    settings.batch.pad_id = tokenizer.eos_id().unwrap_or(0);
    settings.grad_accum = args.grad_accum;
    if let Some(w) = args.warmup {
        settings.warmup_steps = w;
    }
    settings.eval_every = Some(args.eval_every);
    settings.save_every = args.save_every;
    settings.output_dir = args.save_every.map(|_| out.clone());

    println!(
        "data: {} training examples, {} eval, {} tokens ({})",
        train.len(),
        eval.as_ref().map_or(0, Dataset::len),
        train.total_tokens(),
        data_path.display()
    );
    let cut = train.examples_without_targets(&settings.batch);
    if cut > 0 {
        println!(
            "note: {cut} of {} training examples keep no target token within --seq-len {} \
             (their prompts cut the completion off); they teach nothing",
            train.len(),
            settings.batch.seq_len
        );
    }
    let mut trainer = Trainer::new(&model, adapters, recipe, settings)?;
    if let Some(checkpoint) = &args.resume {
        trainer.resume(checkpoint)?;
        println!(
            "resumed from {} at step {}",
            checkpoint.display(),
            trainer.steps_done()
        );
    }
    let start_eval = match &eval {
        Some(e) => Some(trainer.evaluate(e)?),
        None => None,
    };
    if let Some(loss) = start_eval {
        println!("eval loss before training: {loss:.4}");
    }
    let first_step = trainer.steps_done();
    let bar = progress_bar(args.steps, first_step);
    let started = Instant::now();
    let report = trainer.train(&train, eval.as_ref(), |event| match event {
        TrainEvent::Step(log) => {
            bar.set_position(log.step as u64);
            bar.set_message(match log.loss {
                Some(loss) => format!("loss {loss:.4} lr {:.2e} |g| {:.2}", log.lr, log.grad_norm),
                None => "skipped: no target token in the step's rows".to_string(),
            });
        }
        TrainEvent::Eval(e) => say(&bar, format!("step {:>5}: eval loss {:.4}", e.step, e.loss)),
        TrainEvent::Checkpoint(dir) => say(&bar, format!("checkpoint: {}", dir.display())),
        TrainEvent::Stage1(note) => say(&bar, note.to_string()),
    })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    trainer.save_adapter(out)?;
    write_logs(out, &report, start_eval)?;
    summarize(&report, first_step, seconds, out);
    Ok(())
}

fn progress_bar(steps: usize, done: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    if let Ok(style) =
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {per_sec} eta {eta} {wide_msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_position(done as u64);
    bar
}

/// A line above the progress bar, or on stdout when the bar is hidden (not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// `loss_curve.svg` (training loss per step, eval loss per evaluation) and `log.json`.
fn write_logs(out: &Path, report: &TrainReport, start_eval: Option<f64>) -> lorakit::Result<()> {
    let train: Vec<(f64, f64)> = report
        .history
        .iter()
        .filter_map(|l| Some((l.step as f64, l.loss?)))
        .collect();
    let mut eval: Vec<(f64, f64)> = start_eval.map(|l| vec![(0.0, l)]).unwrap_or_default();
    eval.extend(report.evals.iter().map(|e| (e.step as f64, e.loss)));
    let svg = loss_svg(
        &[
            Series {
                name: "train loss",
                points: train,
            },
            Series {
                name: "eval loss",
                points: eval,
            },
        ],
        "optimizer step",
    );
    let svg_path = out.join("loss_curve.svg");
    std::fs::write(&svg_path, svg).map_err(|e| lorakit::Error::io(&svg_path, e))?;
    let log =
        serde_json::json!({ "steps": report.history, "evals": report.evals, "note": report.note });
    let log_path = out.join("log.json");
    std::fs::write(&log_path, log.to_string()).map_err(|e| lorakit::Error::io(&log_path, e))
}

/// What the run did; speed counts the steps of this run (after `first_step`, where a
/// resumed run started).
fn summarize(report: &TrainReport, first_step: usize, seconds: f64, out: &Path) {
    let this_run: Vec<_> = report
        .history
        .iter()
        .filter(|l| l.step > first_step)
        .collect();
    let tokens: usize = this_run.iter().map(|l| l.targets).sum();
    let losses: Vec<f64> = this_run.iter().filter_map(|l| l.loss).collect();
    if let (Some(first), Some(last)) = (losses.first(), losses.last()) {
        println!(
            "trained {} steps in {seconds:.1} s ({:.0} target tokens/s): loss {first:.4} -> {last:.4}",
            this_run.len(),
            tokens as f64 / seconds.max(1e-9),
        );
    }
    let skipped = this_run.len() - losses.len();
    if skipped > 0 {
        println!("{skipped} step(s) skipped: their rows held no target token");
    }
    if let Some(e) = report.evals.last() {
        println!("final eval loss: {:.4}", e.loss);
    }
    if let Some(note) = &report.note {
        println!("{note}");
    }
    println!(
        "adapter (PEFT format), loss_curve.svg, log.json: {}",
        out.display()
    );
}

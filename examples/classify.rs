//! Fine-tune a sequence classifier — BERT, RoBERTa / XLM-RoBERTa / CamemBERT,
//! DistilBERT, ELECTRA, a Llama-family decoder or GPT-2 — with any
//! lorakit variant (PEFT's `SEQ_CLS`: the adapter on the model, a new classifier head
//! trained in full) and write the adapter as a PEFT directory.
//!
//! ```text
//! cargo run --release --example classify -- --model <folder> --data <file.jsonl> \
//!     --num-labels N --method <variant> --out <adapter dir> [--steps N] [--lr F] ...
//! cargo run --release --example classify          # the committed tiny encoder and data
//! ```
//!
//! `<folder>` is a Hugging Face model folder (`config.json`, `model.safetensors` or
//! shards, `tokenizer.json`) whose `model_type` is one of
//! `lorakit::models::CLASSIFIER_MODEL_TYPES` (`bert`, `roberta`, `xlm-roberta`, `llama`,
//! `qwen2`, `gpt2`, …): a pretrained model such as `roberta-base` or a causal LM (a new
//! head — the encoders' `classifier`, the decoders' `score` — is initialised as transformers
//! does, and so is BERT's pooler when the checkpoint has none, as a masked-LM save does;
//! both train in full) or a classifier. A decoder reads each example at its last token;
//! the batches pad with the config's `pad_token_id`, or the tokenizer's padding token
//! when the config names none. The JSONL holds
//! `{"text": ..., "label": <class index>}` rows (or a class name, with `--labels
//! negative,positive` when the config names no classes; `text_pair` for sentence pairs; see
//! `lorakit::finetune::labeled`). With no arguments it trains on the tiny encoder,
//! tokenizer and sentences in `tests/fixtures/finetune/classify/`.

use std::path::PathBuf;
use std::str::FromStr;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use clap::Parser;
use lorakit::finetune::{AdapterRecipe, LabeledDataset, TrainConfig, TrainEvent, Trainer};
use lorakit::models::bert::BertFamily;
use lorakit::models::classification::ClassifierConfig;
use lorakit::models::{AutoCausalLm, AutoSequenceClassifier};
use lorakit::tokenizer::TextTokenizer;
use lorakit::Variant;

const DEMO: &str = "tests/fixtures/finetune/classify";

#[derive(Parser, Debug)]
#[command(
    about = "Fine-tune a BERT-family (BERT, RoBERTa, DistilBERT, ELECTRA), Llama-family or GPT-2 classifier with a lorakit adapter (no arguments: a tiny demo)"
)]
struct Args {
    /// Model folder (config.json, safetensors, tokenizer.json; the tokenizer may instead
    /// be in --tokenizer): the BERT family (BERT, RoBERTa, XLM-R, CamemBERT, DistilBERT, ELECTRA), Llama family or GPT-2. Default: the committed tiny encoder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder with tokenizer.json, when not in --model.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Labeled JSONL: {"text": ..., "label": N} (and "text_pair") per line.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Classes (default: the config's id2label / num_labels; a Hub encoder says 2).
    #[arg(long)]
    num_labels: Option<usize>,
    /// The classes' names in index order, comma-separated, for data whose labels are
    /// strings (sets the config's id2label and num_labels).
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Replace a checkpoint head of another number of classes with a new one
    /// (transformers' ignore_mismatched_sizes); otherwise such a head is an error.
    #[arg(long)]
    ignore_mismatched_sizes: bool,
    /// The variant: lora, lora-plus, vera, lora-fa, lora-drop, adalora, dora, delta-lora.
    #[arg(long, default_value = "lora")]
    method: String,
    /// Where the adapter (a PEFT directory) goes.
    #[arg(long, default_value = "target/classify-demo/adapter")]
    out: PathBuf,
    /// Optimizer steps (default: 3 epochs; the demo 60).
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate (default: 5e-4; the demo 5e-2).
    #[arg(long)]
    lr: Option<f64>,
    /// Rank (VeRA: the shared pair's rank; AdaLoRA: the initial rank).
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Target modules, comma-separated, or all-linear (default: the BERT family's query,value (DistilBERT: q_lin,v_lin); the
    /// Llama family's q_proj,v_proj; GPT-2's c_attn).
    #[arg(long)]
    targets: Option<String>,
    /// Examples per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Longest example, in tokens (texts are cut to it).
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Examples held out for evaluation (0: none).
    #[arg(long, default_value_t = 6)]
    eval_examples: usize,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 20)]
    eval_every: usize,
    /// Seed of the adapter's init, the split and the data order.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn main() {
    lorakit::memory::retain_freed_buffers();
    lorakit::threads::park_idle_elementwise_workers();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> lorakit::Result<()> {
    let model_dir = args
        .model
        .clone()
        .unwrap_or_else(|| format!("{DEMO}/encoder").into());
    let tokenizer_dir = match (&args.tokenizer, &args.model) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => dir.clone(),
        (None, None) => format!("{DEMO}/tokenizer").into(),
    };
    let data_file = args
        .data
        .clone()
        .unwrap_or_else(|| format!("{DEMO}/train.jsonl").into());

    let dev = Device::Cpu;
    // The new head, and BERT's pooler when the checkpoint has none (a masked-LM save).
    let trained_in_full = AutoSequenceClassifier::modules_to_save(&model_dir)?;
    let tokenizer = TextTokenizer::from_dir(&tokenizer_dir)?;
    let mut labels = ClassifierConfig::from_file(model_dir.join("config.json"))?;
    if let Some(n) = args.num_labels {
        labels.num_labels = n;
    }
    if let Some(names) = &args.labels {
        labels.num_labels = names.len();
        labels.id2label = names.clone();
    }
    labels.ignore_mismatched_sizes = args.ignore_mismatched_sizes;
    // transformers' `model.config.pad_token_id = tokenizer.pad_token_id` for a decoder.
    let tokenizer_pad = ["[PAD]", "<pad>", "<|endoftext|>"]
        .iter()
        .find_map(|t| tokenizer.token_id(t));
    labels.pad_token_id = labels.pad_token_id.or(tokenizer_pad);
    let shapes = AutoSequenceClassifier::linear_shapes(&model_dir)?;

    let variant = Variant::from_str(&args.method)?;
    let model_type = AutoCausalLm::model_type(&model_dir)?;
    let targets = args
        .targets
        .clone()
        .unwrap_or_else(|| default_targets(&model_type));
    let targets: Vec<&str> = targets.split(',').map(str::trim).collect();
    let mut recipe = AdapterRecipe::new(variant, args.rank, 2.0 * args.rank as f64, &targets);
    if trained_in_full.len() > 1 {
        println!(
            "the checkpoint has no pooler: training it with the head (modules_to_save {trained_in_full:?})"
        );
    }
    recipe.modules_to_save = trained_in_full;
    recipe.seed = args.seed;
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    let plan = recipe.plan(vb, &shapes, DType::F32, &dev)?;
    let model = AutoSequenceClassifier::from_pretrained(
        &model_dir,
        Some(&labels),
        DType::F32,
        &dev,
        &plan,
    )?;
    let classifier = model.as_classifier();
    let seq_len = args
        .seq_len
        .min(classifier.max_positions().unwrap_or(usize::MAX));
    let data = LabeledDataset::from_jsonl(&data_file, &tokenizer, seq_len)?;
    let (train, eval) = match args.eval_examples {
        0 => (data, None),
        n => {
            let (train, eval) = data.split_eval(n, args.seed)?;
            (train, Some(eval))
        }
    };

    let demo = args.model.is_none();
    let epoch_steps = train.len().div_ceil(args.batch_size.max(1));
    let steps = args
        .steps
        .unwrap_or(if demo { 60 } else { 3 * epoch_steps });
    let mut settings = TrainConfig::new(steps);
    settings.lr = args.lr.unwrap_or(if demo { 5e-2 } else { 5e-4 });
    settings.batch.batch_size = args.batch_size;
    settings.batch.seq_len = seq_len;
    settings.batch.pad_id = classifier.pad_token_id().or(tokenizer_pad).unwrap_or(0);
    settings.eval_every = Some(args.eval_every);
    settings.seed = args.seed;
    println!(
        "{}: {} train / {} eval examples from {}, {} classes, {}",
        model_dir.display(),
        train.len(),
        eval.as_ref().map_or(0, LabeledDataset::len),
        data_file.display(),
        classifier.num_labels(),
        recipe.describe()
    );
    let mut trainer = Trainer::for_classifier(classifier, plan.finish()?, recipe, settings)?;
    if let Some(eval) = &eval {
        let start = trainer.evaluation(eval)?;
        println!(
            "before: eval loss {:.4}, accuracy {}",
            start.loss,
            percent(start.accuracy)
        );
    }
    trainer.train(&train, eval.as_ref(), |event| match event {
        TrainEvent::Eval(e) => {
            println!(
                "step {:>4}: eval loss {:.4}, accuracy {}",
                e.step,
                e.loss,
                percent(e.accuracy)
            );
        }
        TrainEvent::Stage1(note) => println!("{note}"),
        _ => {}
    })?;
    let fit = trainer.evaluation(&train)?;
    println!(
        "training set: loss {:.4}, accuracy {}",
        fit.loss,
        percent(fit.accuracy)
    );
    if demo {
        println!("(the demo's encoder is random and its data 24 sentences: it fits them, it does not generalize)");
    }
    trainer.save_adapter(&args.out)?;
    println!(
        "adapter written to {} (task_type SEQ_CLS)",
        args.out.display()
    );
    Ok(())
}

/// The usual targets for a `model_type` (PEFT's defaults where it has one): the BERT
/// family's attention query and value (DistilBERT's q_lin and v_lin), GPT-2's fused
/// c_attn, a Llama-family decoder's q_proj and v_proj.
fn default_targets(model_type: &str) -> String {
    if let Some(family) = BertFamily::from_model_type(model_type) {
        return family.default_targets().join(",");
    }
    match model_type {
        "gpt2" => "c_attn",
        _ => "q_proj,v_proj",
    }
    .to_string()
}

fn percent(share: Option<f64>) -> String {
    share.map_or("-".into(), |a| format!("{:.1}%", 100.0 * a))
}

//! `lorakit classify`: run a sequence classifier folder (with a PEFT `SEQ_CLS` adapter,
//! unmerged or merged) on texts or token ids, print each input's class and probabilities,
//! and optionally write the logits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor, D};
use clap::{ArgGroup, Args};
use lorakit::model::AdapterPlan;
use lorakit::models::bert::ProblemType;
use lorakit::models::classification::ClassifierConfig;
use lorakit::models::{AutoSequenceClassifier, SequenceClassifier};
use lorakit::peft::inspect::not_an_adapter;
use lorakit::peft::load::KEY_PREFIX;
use lorakit::peft::PeftAdapter;
use lorakit::staging::{check_destination, OutputKind};

use super::generate::{
    install_signal_handler, parse_ids_of, tokenizer, usage, write_logits, ModelDType,
};
use super::{emit, fail};

pub const ABOUT: &str = "\
Classify texts with a sequence classifier folder (model_type bert, roberta, xlm-roberta,
camembert, distilbert, electra, llama, mistral, qwen2,
qwen3, smollm3, phi3, gemma, gemma2, gemma3_text, gemma3, olmo2, olmo3, mixtral, qwen2_moe, qwen3_moe, gpt_oss or gpt2) and, optionally, a PEFT SEQ_CLS
adapter applied to it (unmerged, or merged into the base weights with --merge).

--text is encoded with the folder's tokenizer.json (special tokens added, as transformers'
tokenizer(text) adds them; --text-pair gives a BERT sentence pair); --ids takes token ids.
Repeat either for several inputs. Each input prints one line: for classification, the
most likely class (its name from the config's id2label, else its index) and every class's
probability (softmax); for multi-label classification, the classes at probability ≥ 0.5
(sigmoid) and the probabilities; for regression, the values. A decoder reads each input at
its last token that is not the config's pad_token_id, as transformers does. A folder saved
from a causal LM has no head and no labels: give the adapter that trained one, and
--num-labels when its head has another number of classes than the config's (2 by default).
--logits-out writes the logits, one f32 tensor `logits` of shape [inputs, num_labels], to a
safetensors file (written under a temporary name and renamed into place). Runs on the CPU,
or on the first CUDA GPU in a build with the `cuda` feature.";

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").required(true).args(["text", "ids"])))]
pub struct ClassifyArgs {
    /// The model folder: config.json, model.safetensors (or shards and their index), and tokenizer.json for --text
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A PEFT adapter folder (adapter_config.json and adapter_model.safetensors) to apply
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Merge the adapter into the base weights before classifying
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// A text to classify, encoded with the model folder's tokenizer.json; repeat for several
    #[arg(long, value_name = "TEXT")]
    text: Vec<String>,
    /// The second text of a sentence pair (BERT), one per --text, in order
    #[arg(long, value_name = "TEXT", requires = "text")]
    text_pair: Vec<String>,
    /// An input as comma-separated token ids, e.g. 1,2,3; repeat for several
    #[arg(long, value_name = "IDS", conflicts_with = "text")]
    ids: Vec<String>,
    /// The number of classes of the head (default: the config's id2label or num_labels)
    #[arg(long, value_name = "N")]
    num_labels: Option<usize>,
    /// The dtype the model computes in
    #[arg(long, value_enum, value_name = "DTYPE", default_value_t = ModelDType::F32)]
    dtype: ModelDType,
    /// Write the logits ([inputs, num_labels] f32, named `logits`) to this .safetensors file
    #[arg(long, value_name = "FILE")]
    logits_out: Option<PathBuf>,
}

/// One input: token ids and token types.
type Input = (Vec<u32>, Vec<u32>);

pub fn classify(args: ClassifyArgs) -> ExitCode {
    install_signal_handler();
    if !args.text_pair.is_empty() && args.text_pair.len() != args.text.len() {
        return usage(&format!(
            "--text-pair: give one per --text ({} texts, {} pairs)",
            args.text.len(),
            args.text_pair.len()
        ));
    }
    if args.num_labels == Some(0) {
        return usage("--num-labels: at least 1");
    }
    let ids = match args
        .ids
        .iter()
        .map(|text| parse_ids_of("--ids", text))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(ids) => ids,
        Err(msg) => return usage(&msg),
    };
    if let Some(out) = &args.logits_out {
        if let Err(e) = check_destination(out, OutputKind::File) {
            return fail(e);
        }
    }
    match run(&args, ids) {
        Ok(text) => emit(&text),
        Err(e) => fail(e),
    }
}

/// Loads, classifies, writes the logits; the text to print.
fn run(args: &ClassifyArgs, ids: Vec<Vec<u32>>) -> lorakit::Result<String> {
    let device = Device::cuda_if_available(0)?;
    // The tokenizer first: a missing one is reported before the model is loaded.
    let mut inputs: Vec<Input> = ids
        .into_iter()
        .map(|ids| {
            let types = vec![0; ids.len()];
            (ids, types)
        })
        .collect();
    if !args.text.is_empty() {
        let tok = tokenizer(&args.model)?;
        for (k, text) in args.text.iter().enumerate() {
            let pair = args.text_pair.get(k).map(String::as_str);
            inputs.push(tok.encode_with_types(text, pair)?);
        }
    }
    let model = load_model(args, &device)?;
    let classifier = model.as_classifier();
    // On a rayon worker, so the forwards' products do not each wake the pool and wait
    // for it (`threads::on_worker`).
    let logits = lorakit::threads::on_worker(|| -> lorakit::Result<Vec<Tensor>> {
        let mut logits = Vec::with_capacity(inputs.len());
        for (ids, types) in &inputs {
            let ids = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
            let types = Tensor::new(types.as_slice(), &device)?.unsqueeze(0)?;
            let types = (classifier.type_vocab_size() > 1).then_some(&types);
            logits.push(classifier.classify(&ids, types, None, false)?);
        }
        Ok(logits)
    })?;
    let logits = Tensor::cat(&logits, 0)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let text = describe(classifier, &logits)?;
    if let Some(path) = &args.logits_out {
        write_logits(path, logits)?;
    }
    Ok(text)
}

/// The classifier with its adapter (merged with `--merge`), `--num-labels` applied.
fn load_model(args: &ClassifyArgs, device: &Device) -> lorakit::Result<AutoSequenceClassifier> {
    if let Some(e) = args.adapter.as_deref().and_then(not_an_adapter) {
        return Err(e);
    }
    let adapter = args
        .adapter
        .as_ref()
        .map(|dir| PeftAdapter::load(dir, device))
        .transpose()?;
    let plan = match &adapter {
        Some(adapter) => adapter.plan()?,
        None => AdapterPlan::none(),
    };
    let labels = match args.num_labels {
        Some(n) => {
            let mut labels = ClassifierConfig::from_file(args.model.join("config.json"))?;
            labels.num_labels = n;
            Some(labels)
        }
        None => None,
    };
    let dtype = args.dtype.into();
    let model =
        AutoSequenceClassifier::from_pretrained(&args.model, labels.as_ref(), dtype, device, &plan)
            .map_err(|e| with_num_labels_hint(e, args, adapter.as_ref()))?;
    let adapted = plan.finish()?;
    if args.merge {
        adapted.merge_all(true)?;
    }
    Ok(model)
}

/// `e` (the model failed to load) with a hint when `--num-labels` was not given and the
/// adapter stores a head with another number of rows than the config's classes.
fn with_num_labels_hint(
    e: lorakit::Error,
    args: &ClassifyArgs,
    adapter: Option<&PeftAdapter>,
) -> lorakit::Error {
    let classes = ClassifierConfig::from_file(args.model.join("config.json")).map(|c| c.num_labels);
    let head = adapter
        .and_then(|a| head_rows(&args.model, a))
        .filter(|(_, rows)| classes.as_ref().is_ok_and(|n| n != rows));
    match (args.num_labels, &args.adapter, head) {
        (None, Some(dir), Some((head, rows))) => lorakit::Error::usage(
            lorakit::error::Scope::File(dir.clone()),
            format!(
                "{e}; the adapter's head `{head}` has {rows} rows: pass --num-labels {rows} (the \
                 model's config.json describes another number of classes)"
            ),
        ),
        _ => e,
    }
}

/// The layer of the model's classification head whose rows are the classes
/// (`classifier`, `classifier.out_proj` or `score`, by its `model_type`) and the number of
/// rows the adapter stores for it (`modules_to_save`), if it stores the head.
fn head_rows(model: &Path, adapter: &PeftAdapter) -> Option<(&'static str, usize)> {
    let head = AutoSequenceClassifier::label_layer(model).ok()?;
    let rows = adapter
        .tensor(&format!("{KEY_PREFIX}{head}.weight"))
        .and_then(|t| t.dims().first().copied())?;
    Some((head, rows))
}

/// One line per row of `logits` `(inputs, num_labels)`, as the problem type reads them.
fn describe(model: &dyn SequenceClassifier, logits: &Tensor) -> lorakit::Result<String> {
    let n = model.num_labels();
    let problem = model.problem_type().unwrap_or(if n == 1 {
        ProblemType::Regression
    } else {
        ProblemType::SingleLabelClassification
    });
    let names = model.label_names();
    let name = |c: usize| names.get(c).cloned().unwrap_or_else(|| c.to_string());
    let scores = match problem {
        ProblemType::Regression => logits.clone(),
        ProblemType::SingleLabelClassification => candle_nn::ops::softmax(logits, D::Minus1)?,
        ProblemType::MultiLabelClassification => candle_nn::ops::sigmoid(logits)?,
    };
    let mut text = String::new();
    for row in scores.to_vec2::<f32>()? {
        let values: Vec<String> = row.iter().map(|v| format!("{v:.4}")).collect();
        let head = match problem {
            ProblemType::Regression => None,
            ProblemType::SingleLabelClassification => {
                let best = (0..row.len())
                    .max_by(|&a, &b| {
                        row.get(a)
                            .partial_cmp(&row.get(b))
                            .unwrap_or(std::cmp::Ordering::Equal)
                    })
                    .unwrap_or(0);
                Some(name(best))
            }
            ProblemType::MultiLabelClassification => {
                let on: Vec<String> = (0..row.len())
                    .filter(|&c| row.get(c).is_some_and(|&p| p >= 0.5))
                    .map(name)
                    .collect();
                Some(if on.is_empty() {
                    "-".to_string()
                } else {
                    on.join(",")
                })
            }
        };
        if let Some(head) = head {
            text.push_str(&head);
            text.push('\t');
        }
        text.push_str(&values.join(" "));
        text.push('\n');
    }
    Ok(text)
}

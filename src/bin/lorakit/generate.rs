//! `lorakit generate`: load a model folder (with a PEFT adapter, unmerged or merged), run a
//! prompt through it, print what it generates, and optionally write the prompt's logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use clap::{ArgGroup, Args, ValueEnum};
use lorakit::model::{AdapterPlan, NamedAdapters};
use lorakit::models::generation::{stop_tokens, GenerationConfig};
use lorakit::models::sampling::Sampling;
use lorakit::models::AutoCausalLm;
use lorakit::peft::inspect::not_an_adapter;
use lorakit::peft::PeftAdapter;
use lorakit::staging::{check_destination, write_atomic, OutputKind};
use lorakit::tokenizer::TextTokenizer;

use super::{emit, fail, one_line, INTERRUPTED};

pub const ABOUT: &str = "\
Generate text with a model folder (model_type llama, mistral, qwen2, qwen3, granite, smollm3,
phi3, gemma, gemma2, gemma3_text, olmo2, olmo3, mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, gemma3 (its text decoder) or gpt2) and, optionally, a PEFT adapter applied to it
(unmerged, or merged into the base weights with --merge). Several adapters load side by side as
--adapter NAME=DIR, repeated; --active NAME picks the one to generate with (default: the
first).

--prompt is encoded with the folder's tokenizer.json (special tokens added as
transformers' tokenizer(text) adds them) and the new text is printed; --prompt-ids takes
token ids and prints the new ids, comma-separated. Repeat --prompt (or --prompt-ids) to
generate for several prompts in one left-padded batch: one output line per prompt, in
order, each what that prompt gives alone (greedy). Decoding is greedy unless --temperature
is above 0 (then --top-k / --top-p filter and --seed fixes the draws). Generation stops
after --max-new-tokens tokens or at the model's end-of-sequence token
(generation_config.json's eos_token_id, else config.json's, else the tokenizer's),
unless --ignore-eos. --logits-out writes the prompt's logits, one f32 tensor `logits`
of shape [tokens, vocab], to a safetensors file (written under a temporary name and
renamed into place). Runs on the CPU, or on the first CUDA GPU in a build with the `cuda`
feature.";

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "prompt_ids"])))]
pub struct GenerateArgs {
    /// The model folder: config.json, model.safetensors (or shards and their index), and tokenizer.json for --prompt
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// A PEFT adapter folder (adapter_config.json and adapter_model.safetensors) to apply;
    /// repeat as NAME=DIR to load several onto the model (PEFT's load_adapter)
    #[arg(long, value_name = "[NAME=]DIR")]
    adapter: Vec<String>,
    /// With several adapters: the NAME to generate with (default: the first)
    #[arg(long, value_name = "NAME", requires = "adapter")]
    active: Option<String>,
    /// Merge the (active) adapter into the base weights before generating
    #[arg(long, requires = "adapter")]
    merge: bool,
    /// The prompt text, encoded with the model folder's tokenizer.json; repeat for a batch
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,
    /// The prompt as comma-separated token ids, e.g. 1,2,3 (the new ids are printed); repeat for a batch
    #[arg(long, value_name = "IDS")]
    prompt_ids: Vec<String>,
    /// The most tokens to generate
    #[arg(long, value_name = "N", default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy decoding
    #[arg(
        long,
        value_name = "T",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    temperature: f64,
    /// Sample only from the most likely tokens whose probabilities reach P, in (0, 1]
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// Sample only from the K most likely tokens
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// The sampler's seed (the same seed, the same output)
    #[arg(long, value_name = "S", default_value_t = 0)]
    seed: u64,
    /// The dtype the model computes in
    #[arg(long, value_enum, value_name = "DTYPE", default_value_t = ModelDType::F32)]
    dtype: ModelDType,
    /// Do not stop at the model's end-of-sequence token
    #[arg(long)]
    ignore_eos: bool,
    /// Write the prompt's logits ([tokens, vocab] f32, named `logits`) to this .safetensors file
    #[arg(long, value_name = "FILE")]
    logits_out: Option<PathBuf>,
}

/// `--dtype`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(super) enum ModelDType {
    #[value(alias = "float32")]
    F32,
    #[value(alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    Bf16,
}

impl From<ModelDType> for DType {
    fn from(d: ModelDType) -> Self {
        match d {
            ModelDType::F32 => DType::F32,
            ModelDType::F16 => DType::F16,
            ModelDType::Bf16 => DType::BF16,
        }
    }
}

/// Exit status of an argument value the command cannot use (as clap's usage errors).
const USAGE: u8 = 2;

pub fn generate(args: GenerateArgs) -> ExitCode {
    install_signal_handler();
    let sampling = match sampling(&args) {
        Ok(s) => s,
        Err(msg) => return usage(&msg),
    };
    let ids = match args
        .prompt_ids
        .iter()
        .map(|text| parse_ids(text))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(ids) => ids,
        Err(msg) => return usage(&msg),
    };
    if args.logits_out.is_some() && args.prompt.len() + ids.len() > 1 {
        return usage("--logits-out writes one prompt's logits: give one prompt");
    }
    if let Some(out) = &args.logits_out {
        if let Err(e) = check_destination(out, OutputKind::File) {
            return fail(e);
        }
    }
    match run(&args, sampling, ids) {
        Ok(text) => emit(&text),
        Err(e) => fail(e),
    }
}

/// The sampling settings of the arguments, checked; a message for a usage error.
fn sampling(args: &GenerateArgs) -> Result<Sampling, String> {
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    sampling.validate().map_err(|e| {
        let text = e.to_string();
        // "sampling: invalid `top_p`: …" → "--top-p: …"
        for (field, flag) in [
            ("temperature", "--temperature"),
            ("top_k", "--top-k"),
            ("top_p", "--top-p"),
        ] {
            let prefix = format!("sampling: invalid `{field}`: ");
            if let Some(rest) = text.strip_prefix(&prefix) {
                return format!("{flag}: {rest}");
            }
        }
        text
    })?;
    if sampling.is_greedy() && (args.top_k.is_some() || args.top_p.is_some()) {
        return Err(
            "--top-k and --top-p filter sampled tokens: give --temperature above 0 too \
             (temperature 0 is greedy decoding)"
                .to_string(),
        );
    }
    Ok(sampling)
}

/// `1,2,3` (spaces allowed around each id) as token ids.
fn parse_ids(text: &str) -> Result<Vec<u32>, String> {
    parse_ids_of("--prompt-ids", text)
}

/// The value `text` of the token-id flag `flag` (`1,2,3`, spaces allowed around each id).
pub(super) fn parse_ids_of(flag: &str, text: &str) -> Result<Vec<u32>, String> {
    if text.trim().is_empty() {
        return Err(format!("{flag} is empty: give token ids, e.g. 1,2,3"));
    }
    text.split(',')
        .map(|part| {
            let part = part.trim();
            part.parse::<u32>().map_err(|_| {
                format!(
                    "{flag}: `{part}` is not a token id (comma-separated integers \
                     from 0 to 4294967295, e.g. 1,2,3)"
                )
            })
        })
        .collect()
}

/// Loads, generates, writes the logits; the text to print.
fn run(args: &GenerateArgs, sampling: Sampling, ids: Vec<Vec<u32>>) -> lorakit::Result<String> {
    let device = Device::cuda_if_available(0)?;
    // The tokenizer first: a missing one is reported before the model is loaded.
    let tokenizer = if args.prompt.is_empty() {
        None
    } else {
        Some(tokenizer(&args.model)?)
    };
    let model = load_model(args, &device)?;
    let mut prompts = ids;
    if let Some(tok) = &tokenizer {
        for text in &args.prompt {
            prompts.push(tok.encode(text, true)?);
        }
    }
    let mut eos = Vec::new();
    if !args.ignore_eos {
        eos = stop_tokens(&args.model)?;
        if eos.is_empty() {
            eos.extend(tokenizer.as_ref().and_then(TextTokenizer::eos_id));
        }
    }
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        eos,
        sampling,
    };
    // generate checks the prompts (ids in the vocabulary, positions) before any work.
    let outputs = match prompts.as_slice() {
        [prompt] => vec![model.generate(prompt, &config)?],
        _ => model.generate_batch(&prompts, &config)?,
    };
    if let (Some(path), [prompt]) = (&args.logits_out, prompts.as_slice()) {
        write_logits(path, prompt_logits(&model, prompt, &device)?)?;
    }
    let mut text = String::new();
    for tokens in &outputs {
        let line = match &tokenizer {
            Some(tok) => tok.decode(tokens, true)?,
            None => tokens
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
        };
        text.push_str(&line);
        text.push('\n');
    }
    Ok(text)
}

/// `--adapter` values as (name, folder): `NAME=DIR`, or a bare `DIR` named `default`
/// (PEFT's name for an adapter loaded without one).
fn adapter_specs(values: &[String]) -> Vec<(String, PathBuf)> {
    values
        .iter()
        .map(|v| match v.split_once('=') {
            Some((name, dir)) if !Path::new(v).exists() => (name.to_string(), PathBuf::from(dir)),
            _ => ("default".to_string(), PathBuf::from(v)),
        })
        .collect()
}

/// The model with its adapters: one adapter as a plain plan; several (or `--active`) as
/// [`NamedAdapters`], the active one chosen; merged with `--merge`.
fn load_model(args: &GenerateArgs, device: &Device) -> lorakit::Result<AutoCausalLm> {
    let specs = adapter_specs(&args.adapter);
    for (_, dir) in &specs {
        if let Some(e) = not_an_adapter(dir) {
            return Err(e);
        }
    }
    let dtype = args.dtype.into();
    if specs.len() <= 1 && args.active.is_none() {
        let plan = match specs.first() {
            Some((_, dir)) => PeftAdapter::load(dir, device)?.plan()?,
            None => AdapterPlan::none(),
        };
        let model = AutoCausalLm::from_pretrained(&args.model, dtype, device, &plan)?;
        let adapted = plan.finish()?;
        if let Some(first) = plan.set_aside_modules().first() {
            eprintln!(
                "note: {} of the adapter's modules (e.g. {first}) are in the vision tower, \
                 which text does not reach: not applied",
                plan.set_aside_modules().len()
            );
        }
        if args.merge {
            adapted.merge_all(true)?;
        }
        return Ok(model);
    }
    let adapters = NamedAdapters::new();
    let plan = adapters.plan();
    let model = AutoCausalLm::from_pretrained(&args.model, dtype, device, &plan)?;
    plan.finish()?;
    for (name, dir) in &specs {
        adapters.load_peft(name, dir, device)?;
    }
    if let Some(name) = &args.active {
        adapters.set_active(name)?;
    }
    if args.merge {
        adapters.merge(true)?;
    }
    Ok(model)
}

/// The model folder's tokenizer, or an error that says how to do without one.
pub(super) fn tokenizer(dir: &Path) -> lorakit::Result<TextTokenizer> {
    if dir.is_dir() && !dir.join("tokenizer.json").is_file() {
        return Err(lorakit::Error::checkpoint(
            dir,
            "no tokenizer.json in the model folder to encode the text with; give token ids \
             instead (--prompt-ids / --ids 1,2,3)",
        ));
    }
    TextTokenizer::from_dir(dir)
}

/// The prompt's logits `[tokens, vocab]` in f32 on the CPU.
fn prompt_logits(model: &AutoCausalLm, prompt: &[u32], device: &Device) -> lorakit::Result<Tensor> {
    let ids = Tensor::new(prompt, device)?.unsqueeze(0)?;
    // On a rayon worker, as generation runs (`threads::on_worker`).
    Ok(lorakit::threads::on_worker(|| model.forward(&ids))?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?)
}

/// Writes `logits` as the one tensor `logits` of a safetensors file, atomically.
pub(super) fn write_logits(path: &Path, logits: Tensor) -> lorakit::Result<()> {
    let tensors = HashMap::from([("logits".to_string(), logits)]);
    let bytes =
        safetensors::serialize(&tensors, None).map_err(|e| lorakit::Error::SafeTensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomic(path, &bytes)
}

/// A usage error: one line, exit status 2.
pub(super) fn usage(msg: &str) -> ExitCode {
    eprintln!("error: {}", one_line(&msg));
    ExitCode::from(USAGE)
}

/// SIGINT / SIGTERM: remove the temporary of a logits file being written, and stop.
pub(super) fn install_signal_handler() {
    let _ = ctrlc::set_handler(|| {
        lorakit::staging::remove_live_temporaries();
        eprintln!("interrupted");
        std::process::exit(INTERRUPTED.into());
    });
}

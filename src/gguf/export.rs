//! A PEFT LoRA adapter as a llama.cpp LoRA adapter in GGUF (`llama-cli --lora FILE`).
//!
//! The format is the one llama.cpp's `convert_lora_to_gguf.py` writes and
//! `src/llama-adapter.cpp` (`llama_adapter_lora_init_impl`) reads:
//!
//! - metadata `general.type = "adapter"`, `adapter.type = "lora"` (both required by the
//!   loader), `general.architecture` (must equal the model's), `adapter.lora.alpha` (f32;
//!   llama.cpp scales every pair by `alpha / rank`, `rank` being the pair's own
//!   `lora_b` row count, or by 1 when alpha is 0), plus `general.file_type` and
//!   `general.quantization_version` as the converter writes them, and for an activated LoRA
//!   (PEFT's `alora_invocation_tokens`) `adapter.alora.invocation_tokens` (u32 array), the
//!   one other adapter key the loader reads;
//! - for each adapted base tensor `NAME` (its GGUF name, e.g. `blk.0.attn_q.weight`), the
//!   pair `NAME.lora_a` = PEFT's `lora_A` (`(r, in)`, GGUF `ne = [in, r]`) and
//!   `NAME.lora_b` = PEFT's `lora_B` (`(out, r)`, `ne = [r, out]`), untransposed; for the
//!   token embedding `token_embd.weight.lora_a` = `lora_embedding_A` transposed
//!   (`(vocab, r)`) and `.lora_b` = `lora_embedding_B` (`(dim, r)`), as the loader's shape
//!   check for `token_embd` expects;
//! - for the `llama` architecture (Llama and Mistral checkpoints) `q_proj`'s and `k_proj`'s
//!   `lora_B` rows are permuted like the base weights ([`super::permute`]).
//!
//! What llama.cpp cannot express is refused by name: DoRA (`lora_magnitude_vector`),
//! VeRA, AdaLoRA, `lora_bias`, biases and `modules_to_save` copies, a module with no
//! llama.cpp tensor, `lm_head` on a model with tied embeddings (llama.cpp has no `output`
//! tensor then; the converter refuses it too). LoRA+, LoRA-FA, LoRA-drop and Delta-LoRA
//! save plain LoRA adapters and export as such (Delta-LoRA's updates of the base weight are
//! not in its adapter file: serve its merged checkpoint to keep them).
//!
//! One `adapter.lora.alpha` serves every pair, so PEFT scales that are not `alpha / r` with
//! a common alpha (rsLoRA's `alpha / √r`, `rank_pattern` with `alpha_pattern`) are
//! handled this way: the alpha written is the one most pairs need (`scale · r`), and each
//! other pair's `lora_b` is multiplied by its scale's ratio to `alpha / r` (folded). Each
//! such decision is reported in [`GgufExportReport::notes`]. (`convert_lora_to_gguf.py`
//! ignores `use_rslora` and the patterns: its files for such adapters are mis-scaled.)

use std::collections::HashMap;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::names::{gguf_module, GgufArch};
use super::permute::{gather_rows, rope_permutation};
use crate::error::{Error, Result, Scope};
use crate::models::llama::LlamaConfig;
use crate::peft::config::PeftType;
use crate::peft::inspect::load_adapter;
use crate::peft::load::KEY_PREFIX;
use crate::peft::lora_extensions::check_base_unchanged;
use crate::peft::PeftAdapter;
use crate::staging::StagedFile;
use crate::variants::lora_embedding::{EMBEDDING_A, EMBEDDING_B};

/// The dtype of the exported `lora_a` / `lora_b` tensors (`convert_lora_to_gguf.py
/// --outtype`; f32 is its default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GgufDType {
    /// 32-bit floats.
    #[default]
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    BF16,
}

impl GgufDType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufDType::F32 => GgmlDType::F32,
            GgufDType::F16 => GgmlDType::F16,
            GgufDType::BF16 => GgmlDType::BF16,
        }
    }

    /// llama.cpp's `general.file_type` (`LlamaFileType`: ALL_F32, MOSTLY_F16, MOSTLY_BF16).
    fn file_type(self) -> u32 {
        match self {
            GgufDType::F32 => 0,
            GgufDType::F16 => 1,
            GgufDType::BF16 => 32,
        }
    }
}

/// Options of [`export_gguf`].
#[derive(Clone, Copy, Debug, Default)]
pub struct GgufExportOptions {
    /// The dtype of the written tensors.
    pub dtype: GgufDType,
}

/// What [`export_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct GgufExportReport {
    /// `general.architecture`.
    pub arch: GgufArch,
    /// `adapter.lora.alpha`.
    pub alpha: f32,
    /// The number of `lora_a` / `lora_b` pairs.
    pub pairs: usize,
    /// How scales that llama.cpp's single alpha cannot express were written (one line
    /// each); empty for a plain LoRA adapter.
    pub notes: Vec<String>,
}

/// A PEFT LoRA adapter in llama.cpp's layout, in memory (f32): what [`export_gguf`] writes.
///
/// ```
/// use candle_core::Device;
/// use lorakit::gguf::GgufLora;
/// use lorakit::models::llama::LlamaConfig;
/// use lorakit::peft::PeftAdapter;
/// # fn main() -> lorakit::Result<()> {
/// let dir = "tests/fixtures/models/llama/qwen3";
/// let adapter = PeftAdapter::load(format!("{dir}/lora"), &Device::Cpu)?;
/// let lora = GgufLora::from_adapter(&adapter, &LlamaConfig::from_file(format!("{dir}/base"))?)?;
/// assert_eq!(lora.arch.name(), "qwen3");
/// assert_eq!(lora.alpha, 16.0); // r = 4, lora_alpha = 16: llama.cpp scales by 16 / 4
/// let (name, a) = &lora.tensors[0];
/// assert_eq!(name, "blk.0.attn_k.weight.lora_a");
/// assert_eq!(a.dims(), [4, 32]); // PEFT's lora_A, (r, in)
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct GgufLora {
    /// `general.architecture`.
    pub arch: GgufArch,
    /// `adapter.lora.alpha`.
    pub alpha: f32,
    /// `(GGUF name, tensor)` in candle's (row-major) order, `lora_a` before `lora_b`,
    /// sorted by name.
    pub tensors: Vec<(String, Tensor)>,
    /// See [`GgufExportReport::notes`].
    pub notes: Vec<String>,
    /// An activated LoRA's invocation tokens (PEFT's `alora_invocation_tokens`), written as
    /// `adapter.alora.invocation_tokens` (u32 array), which llama.cpp's loader reads.
    pub alora_invocation_tokens: Option<Vec<u32>>,
}

/// One adapted module, oriented and permuted for llama.cpp.
struct Pair {
    module: String,
    gguf: String,
    a: Tensor,
    b: Tensor,
    rank: usize,
    /// The alpha llama.cpp needs to scale this pair as PEFT does: `scale · rank`.
    alpha: f64,
}

/// Which of a module's tensors a PEFT key holds.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Part {
    A,
    B,
    EmbeddingA,
    EmbeddingB,
}

fn refuse(what: &'static str, got: impl Into<String>, why: &str) -> Error {
    Error::Unsupported {
        what,
        got: got.into(),
        supported: why.to_string(),
    }
}

const ONLY_PAIRS: &str = "lora_A / lora_B (lora_embedding_A / _B) pairs: llama.cpp's LoRA \
    adapter format has no place for any other tensor";

/// The module and part of a PEFT tensor key; `None` for a base-weight copy PEFT saves
/// beside an adapted embedding or head (`base_layer.weight`, skipped as the converter does).
fn classify(key: &str) -> Result<Option<(String, Part)>> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    let parts = [
        ("lora_A.weight", Part::A),
        ("lora_B.weight", Part::B),
        (EMBEDDING_A, Part::EmbeddingA),
        (EMBEDDING_B, Part::EmbeddingB),
    ];
    for (suffix, part) in parts {
        if let Some(module) = rest.strip_suffix(suffix).and_then(|m| m.strip_suffix('.')) {
            return Ok(Some((module.to_string(), part)));
        }
    }
    if rest.ends_with(".base_layer.weight") {
        return Ok(None);
    }
    if rest.contains("lora_magnitude_vector") {
        return Err(refuse(
            "DoRA tensor in a GGUF export",
            key,
            "plain LoRA: llama.cpp's LoRA adapters add (alpha/r)·B·A and cannot hold DoRA's \
             magnitude vector",
        ));
    }
    Err(refuse("tensor in a GGUF export", key, ONLY_PAIRS))
}

/// Refuses what llama.cpp's LoRA adapters cannot express at the config level.
fn check_config(adapter: &PeftAdapter) -> Result<()> {
    let c = adapter.config();
    // llama.cpp adds B·A to the base as stored: an init that changes the base in PEFT
    // (PiSSA, OLoRA, …) would give other outputs there.
    check_base_unchanged(
        &c.raw,
        Scope::File(adapter.source().with_file_name("adapter_config.json")),
        "which a GGUF adapter cannot carry: llama.cpp adds B·A to the base weights as stored",
    )?;
    if c.peft_type != PeftType::Lora {
        return Err(refuse(
            "adapter type for a GGUF export",
            c.peft_type.as_str(),
            "LORA: llama.cpp's LoRA adapters hold lora_a/lora_b pairs scaled by alpha/rank; \
             VeRA's shared matrices and scaling vectors and AdaLoRA's SVD triplets have no \
             place there (merge the adapter into the model instead)",
        ));
    }
    if c.use_dora {
        return Err(refuse(
            "DoRA adapter (use_dora) in a GGUF export",
            "use_dora: true",
            "plain LoRA: llama.cpp's LoRA adapters add (alpha/r)·B·A and cannot hold DoRA's \
             magnitude vector (merge the adapter into the model instead)",
        ));
    }
    if c.lora_bias {
        return Err(refuse(
            "lora_bias in a GGUF export",
            "lora_bias: true",
            "LoRA without a bias on lora_B: llama.cpp's LoRA adapters have no bias",
        ));
    }
    if c.fan_in_fan_out {
        return Err(refuse(
            "fan_in_fan_out (GPT-2 Conv1D) in a GGUF export",
            "fan_in_fan_out: true",
            "Llama-family linear layers",
        ));
    }
    Ok(())
}

/// PEFT's `alora_invocation_tokens` (activated LoRA), if set. An `invocation_string`
/// without tokens is refused: the converter tokenizes it with the base model's tokenizer.
fn alora_tokens(adapter: &PeftAdapter) -> Result<Option<Vec<u32>>> {
    let raw = &adapter.config().raw;
    let file = adapter.source().with_file_name("adapter_config.json");
    match raw.get("alora_invocation_tokens") {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Array(items)) => {
            let tokens = items
                .iter()
                .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect::<Option<Vec<u32>>>();
            return match tokens {
                Some(t) => Ok(Some(t)),
                None => Err(Error::file_config(
                    file,
                    "alora_invocation_tokens",
                    "must be token ids (integers from 0 to 2^32 - 1)",
                )),
            };
        }
        Some(_) => {
            return Err(Error::file_config(
                file,
                "alora_invocation_tokens",
                "must be an array of token ids",
            ))
        }
    }
    match raw
        .get("invocation_string")
        .and_then(serde_json::Value::as_str)
    {
        Some(s) if !s.is_empty() => Err(refuse(
            "aLoRA invocation_string without alora_invocation_tokens in a GGUF export",
            s,
            "alora_invocation_tokens (token ids of the base model's tokenizer; \
             convert_lora_to_gguf.py tokenizes the string with it)",
        )),
        _ => Ok(None),
    }
}

fn two_dims(t: &Tensor, key: &str) -> Result<(usize, usize)> {
    t.dims2().map_err(|_| Error::ShapeMismatch {
        layer: key.to_string(),
        what: "LoRA factor".to_string(),
        expected: "2 dimensions".to_string(),
        got: format!("{:?}", t.dims()),
    })
}

impl GgufLora {
    /// The adapter's pairs under llama.cpp's names for the model `base` describes (its
    /// architecture, head counts and whether embeddings are tied).
    pub fn from_adapter(adapter: &PeftAdapter, base: &LlamaConfig) -> Result<Self> {
        check_config(adapter)?;
        let arch = GgufArch::from_family(base.family)?;
        let mut parts: HashMap<(String, Part), Tensor> = HashMap::new();
        for key in adapter.tensor_names() {
            let Some((module, part)) = classify(&key)? else {
                continue;
            };
            if let Some(t) = adapter.tensor(&key) {
                parts.insert((module, part), t.to_dtype(DType::F32)?);
            }
        }
        let mut modules: Vec<String> = parts.keys().map(|(m, _)| m.clone()).collect();
        modules.sort();
        modules.dedup();
        let mut pairs = Vec::with_capacity(modules.len());
        for module in modules {
            pairs.push(pair(adapter, base, arch, &module, &mut parts)?);
        }
        if pairs.is_empty() {
            return Err(Error::MissingKey {
                key: "lora_A / lora_B tensors".to_string(),
                file: adapter.source().display().to_string(),
            });
        }
        let alora_invocation_tokens = alora_tokens(adapter)?;
        let (alpha, notes) = fold_scales(adapter, &mut pairs)?;
        let mut tensors = Vec::with_capacity(2 * pairs.len());
        for p in pairs {
            tensors.push((format!("{}.lora_a", p.gguf), p.a));
            tensors.push((format!("{}.lora_b", p.gguf), p.b));
        }
        tensors.sort_by(|x, y| x.0.cmp(&y.0));
        Ok(Self {
            arch,
            alpha,
            tensors,
            notes,
            alora_invocation_tokens,
        })
    }

    /// Writes the GGUF file at `out` (built under a temporary name beside it and renamed
    /// into place: a failure leaves no file).
    pub fn write(&self, out: &Path, dtype: GgufDType) -> Result<()> {
        let qtensors = self
            .tensors
            .iter()
            .map(|(n, t)| {
                Ok((
                    n.as_str(),
                    QTensor::quantize(&t.contiguous()?, dtype.ggml())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut metadata = vec![
            (
                "general.architecture",
                Value::String(self.arch.name().to_string()),
            ),
            ("general.type", Value::String("adapter".to_string())),
            ("adapter.type", Value::String("lora".to_string())),
            ("adapter.lora.alpha", Value::F32(self.alpha)),
            ("general.file_type", Value::U32(dtype.file_type())),
            // gguf-py's GGML_QUANT_VERSION, which the converter writes.
            ("general.quantization_version", Value::U32(2)),
        ];
        if let Some(tokens) = &self.alora_invocation_tokens {
            let tokens = tokens.iter().map(|&t| Value::U32(t)).collect();
            metadata.push(("adapter.alora.invocation_tokens", Value::Array(tokens)));
        }
        let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> = qtensors.iter().map(|(n, t)| (*n, t)).collect();
        let (staged, file) = StagedFile::create(out)?;
        let mut w = BufWriter::new(file);
        gguf_file::write(&mut w, &meta_refs, &tensor_refs)
            .map_err(|e| Error::checkpoint(out, format!("writing GGUF: {e}")))?;
        let file = w.into_inner().map_err(|e| Error::io(out, e.into_error()))?;
        staged.commit_file(file)
    }
}

/// The pair of `module`, oriented for llama.cpp, with the alpha it needs.
fn pair(
    adapter: &PeftAdapter,
    base: &LlamaConfig,
    arch: GgufArch,
    module: &str,
    parts: &mut HashMap<(String, Part), Tensor>,
) -> Result<Pair> {
    let mut take = |part: Part, name: &str| {
        parts
            .remove(&(module.to_string(), part))
            .ok_or_else(|| Error::MissingKey {
                key: format!("{KEY_PREFIX}{module}.{name}"),
                file: adapter.source().display().to_string(),
            })
    };
    let gguf = gguf_module(module)
        .filter(|g| !g.ends_with("norm"))
        .ok_or_else(|| {
            refuse(
                "module in a GGUF export",
                module,
                "the Llama family's linear layers (self_attn.q/k/v/o_proj, mlp.gate/up/down_proj, \
                 lm_head) and model.embed_tokens, which have llama.cpp tensor names",
            )
        })?;
    let embedding = gguf == "token_embd";
    let (a, b) = if embedding {
        let a = take(Part::EmbeddingA, EMBEDDING_A)?;
        // The loader expects token_embd's lora_a as (vocab, r): A transposed.
        (a.t()?.contiguous()?, take(Part::EmbeddingB, EMBEDDING_B)?)
    } else {
        (
            take(Part::A, "lora_A.weight")?,
            take(Part::B, "lora_B.weight")?,
        )
    };
    if let Some(((m, _), _)) = parts.iter().find(|((m, _), _)| m == module) {
        return Err(refuse(
            "LoRA tensor in a GGUF export",
            format!("{KEY_PREFIX}{m}"),
            "lora_A / lora_B on a linear layer, lora_embedding_A / _B on the embedding",
        ));
    }
    if module == "lm_head" && base.tie_word_embeddings {
        return Err(refuse(
            "lm_head adapter on a model with tied embeddings in a GGUF export",
            module,
            "untied lm_head: llama.cpp's model has no output tensor to adapt (it reuses \
             token_embd), as convert_lora_to_gguf.py says",
        ));
    }
    let key_a = format!("{KEY_PREFIX}{module}.lora_A");
    let (rows_a, cols_a) = two_dims(&a, &key_a)?;
    let (out, rank) = two_dims(&b, &format!("{KEY_PREFIX}{module}.lora_B"))?;
    // (rank, in): token_embd's A is already transposed to (vocab, rank).
    let (rank_a, d_in) = if embedding {
        (cols_a, rows_a)
    } else {
        (rows_a, cols_a)
    };
    check_base_shape(base, &gguf, module, (d_in, out))?;
    let settings = adapter.config().ranks.for_module(module);
    if rank != rank_a || rank != settings.r {
        return Err(Error::ShapeMismatch {
            layer: module.to_string(),
            what: "LoRA rank (lora_A rows, lora_B columns, the config's r)".to_string(),
            expected: format!("{} everywhere", settings.r),
            got: format!("lora_A {rank_a}, lora_B {rank}"),
        });
    }
    let mut b = b;
    if arch.permutes_qk() {
        let heads = if module.ends_with("self_attn.q_proj") {
            Some(base.num_attention_heads)
        } else if module.ends_with("self_attn.k_proj") {
            Some(base.num_key_value_heads)
        } else {
            None
        };
        if let Some(n_head) = heads {
            b = gather_rows(&b, &rope_permutation(out, n_head, module)?)?;
        }
    }
    let r = settings.r as f64;
    let scale = if adapter.config().use_rslora {
        settings.alpha / r.sqrt()
    } else {
        settings.alpha / r
    };
    Ok(Pair {
        module: module.to_string(),
        gguf: format!("{gguf}.weight"),
        a,
        b,
        rank,
        alpha: if adapter.config().use_rslora {
            scale * r
        } else {
            settings.alpha
        },
    })
}

/// Checks a pair's `(in, out)` against the base model's layer (llama.cpp refuses a
/// mismatch only when the adapter is loaded) and its layer index against the layer count.
fn check_base_shape(
    base: &LlamaConfig,
    gguf: &str,
    module: &str,
    got: (usize, usize),
) -> Result<()> {
    let (d, f, v) = (base.hidden_size, base.intermediate_size, base.vocab_size);
    let q = base.num_attention_heads * base.head_dim;
    let kv = base.num_key_value_heads * base.head_dim;
    let kind = gguf.rsplit('.').next().unwrap_or(gguf);
    let expected = match kind {
        "attn_q" => (d, q),
        "attn_k" | "attn_v" => (d, kv),
        "attn_output" => (q, d),
        "ffn_gate" | "ffn_up" => (d, f),
        "ffn_down" => (f, d),
        "output" => (d, v),
        _ => (v, d), // token_embd: ids in, hidden out
    };
    let layer = gguf
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse::<usize>().ok());
    let in_range = layer.is_none_or(|l| l < base.num_hidden_layers);
    if got != expected || !in_range {
        return Err(Error::ShapeMismatch {
            layer: module.to_string(),
            what: format!(
                "(in, out) of the base model's layer ({} layers; wrong --base?)",
                base.num_hidden_layers
            ),
            expected: format!("{expected:?}"),
            got: format!("{got:?}"),
        });
    }
    Ok(())
}

/// Picks the alpha most pairs need and folds the others' scale ratio into their `lora_b`.
fn fold_scales(adapter: &PeftAdapter, pairs: &mut [Pair]) -> Result<(f32, Vec<String>)> {
    // Count in the file's precision; ties go to the first pair in name order.
    let mut counts: Vec<(f32, usize)> = Vec::new();
    for p in pairs.iter() {
        let a = p.alpha as f32;
        match counts.iter_mut().find(|(x, _)| *x == a) {
            Some((_, n)) => *n += 1,
            None => counts.push((a, 1)),
        }
    }
    let mut alpha = 0f32;
    let mut best = 0;
    for (a, n) in counts {
        if n > best {
            (alpha, best) = (a, n);
        }
    }
    let mut notes = Vec::new();
    let c = adapter.config();
    if c.use_rslora {
        notes.push(format!(
            "use_rslora: adapter.lora.alpha = {alpha} (lora_alpha·√r), so that llama.cpp's \
             alpha/rank equals PEFT's lora_alpha/√r"
        ));
    } else if f64::from(alpha) != c.ranks.alpha {
        notes.push(format!(
            "adapter.lora.alpha = {alpha}, the alpha of most modules (lora_alpha is {})",
            c.ranks.alpha
        ));
    }
    for p in pairs.iter_mut() {
        if p.alpha as f32 != alpha {
            let factor = p.alpha / f64::from(alpha);
            p.b = (&p.b * factor)?;
            notes.push(format!(
                "{}: PEFT scale {} is not adapter.lora.alpha/rank = {alpha}/{}; lora_b \
                 multiplied by {factor} (llama.cpp has one alpha per file)",
                p.module,
                p.alpha / p.rank as f64,
                p.rank
            ));
        }
    }
    Ok((alpha, notes))
}

/// Exports the PEFT LoRA adapter in `adapter_dir` as a llama.cpp LoRA adapter at `out`, for
/// the model whose `config.json` is `base` (a model folder or the file: its architecture
/// picks the GGUF names, its head counts the `q_proj` / `k_proj` permutation). Nothing is
/// left at `out` on an error.
///
/// ```
/// use lorakit::gguf::{export_gguf, GgufExportOptions};
/// # fn main() -> lorakit::Result<()> {
/// let dir = std::path::Path::new("tests/fixtures/models/llama/mistral");
/// let out = std::env::temp_dir().join(format!("lorakit-doc-{}.gguf", std::process::id()));
/// let report = export_gguf(&dir.join("lora"), &dir.join("base"), &out, &GgufExportOptions::default())?;
/// assert_eq!((report.arch.name(), report.alpha, report.pairs), ("llama", 8.0, 14));
/// # std::fs::remove_file(&out).ok();
/// // A DoRA adapter is refused, naming why, and nothing is written.
/// let dora = "tests/fixtures/peft_options/gpt2_dora/adapter".as_ref();
/// let err = export_gguf(dora, &dir.join("base"), &out, &GgufExportOptions::default()).unwrap_err();
/// assert!(err.to_string().contains("DoRA"), "{err}");
/// assert!(!out.exists());
/// # Ok(()) }
/// ```
pub fn export_gguf(
    adapter_dir: &Path,
    base: &Path,
    out: &Path,
    options: &GgufExportOptions,
) -> Result<GgufExportReport> {
    let adapter = load_adapter(adapter_dir)?;
    let config = LlamaConfig::from_file(base)?;
    let lora = GgufLora::from_adapter(&adapter, &config)?;
    lora.write(out, options.dtype)?;
    Ok(GgufExportReport {
        arch: lora.arch,
        alpha: lora.alpha,
        pairs: lora.tensors.len() / 2,
        notes: lora.notes,
    })
}

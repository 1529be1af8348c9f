//! Adapters on an output head tied to the input embedding.
//!
//! A checkpoint saved with `tie_word_embeddings` (Qwen2.5 up to 3B, Llama 3.2 1B and 3B,
//! Gemma, GPT-2 …) has no `lm_head.weight`: the head is the input embedding's table. PEFT
//! puts an adapter on `lm_head` all the same, and the unmerged model is right. PEFT's
//! `merge_and_unload()` then adds the head's change to the shared table, which changes the
//! embedding too, and saves the model still tied: on the fixtures of
//! `scripts/make_tied_head_fixtures.py` its merged model's logits are off by more than the
//! logits' own size (`tests/fixtures/tied_head/*/peft_merge.json`). PEFT warns, and advises
//! untying the head first.
//!
//! A lorakit merge unties it: the head is written as a tensor of its own (the table with the
//! head's adapter merged), the embedding is left as it was (or merged with its own adapter),
//! and the output's `config.json` says `tie_word_embeddings: false`. The merged model then
//! gives the unmerged adapter's logits, at the cost of one more `vocab × hidden` tensor.

use safetensors::tensor::Dtype;
use serde_json::Value;

use crate::checkpoint::convert::is_convertible_float;
use crate::checkpoint::{Checkpoint, StoredTensor};
use crate::model::{FullRegex, ModuleSelector};
use crate::peft::config::PeftConfig;

/// The module names of an output head that transformers ties to the input embedding.
const TIED_HEAD_MODULES: [&str; 1] = ["lm_head"];

/// How transformers' checkpoints name an input embedding's table (the ends of the names):
/// `model.embed_tokens.weight` (Llama, Mistral, Qwen, Gemma, Phi-3, OPT's
/// `model.decoder.embed_tokens.weight`), `transformer.wte.weight` (GPT-2, GPT-J),
/// `…word_embeddings.weight` (BLOOM, Falcon), `gpt_neox.embed_in.weight`,
/// `tok_embeddings.weight`.
const EMBEDDING_TABLE_ENDINGS: [&str; 5] = [
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
];

/// A head a merge writes as its own tensor, untied from the embedding table it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UntiedHead {
    /// The head's weight in the checkpoint's names (`lm_head.weight`), absent from it.
    pub head: String,
    /// The embedding table it is tied to (`model.embed_tokens.weight`).
    pub table: String,
    /// The table's shape and stored dtype (the head's, once written).
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

impl UntiedHead {
    /// The head `head` (a checkpoint name) tied to the checkpoint's tensor `table`.
    pub fn of(head: &str, table: &StoredTensor) -> Self {
        Self {
            head: head.to_string(),
            table: table.name.clone(),
            shape: table.shape.clone(),
            dtype: table.dtype,
        }
    }
}

/// Whether the module `path` is an output head transformers may tie ([`TIED_HEAD_MODULES`]).
fn is_output_head(path: &str) -> bool {
    TIED_HEAD_MODULES.contains(&path.rsplit('.').next().unwrap_or(path))
}

/// The table `ckpt`'s absent head weight `head` (a checkpoint name ending in
/// `lm_head.weight`) is tied to, for a head whose `(out, in)` shape `fits`: the one 2-D
/// float tensor of the checkpoint named like an input embedding ([`EMBEDDING_TABLE_ENDINGS`])
/// that fits. `None` when `head` is not an output head, the checkpoint's `config.json` sets
/// `tie_word_embeddings` to `false` (the head is then missing, not tied), or no table or
/// more than one fits.
pub(crate) fn tied_table(
    ckpt: &Checkpoint,
    head: &str,
    fits: impl Fn(&[usize]) -> bool,
) -> Option<UntiedHead> {
    let module = head.strip_suffix(".weight")?;
    if !is_output_head(module) || config_unties(ckpt) {
        return None;
    }
    let mut tables = ckpt.tensors().map(|(_, t)| t).filter(|t| {
        EMBEDDING_TABLE_ENDINGS
            .iter()
            .any(|end| t.name == *end || t.name.ends_with(&format!(".{end}")))
            && t.shape.len() == 2
            && is_convertible_float(t.dtype)
            && fits(&t.shape)
    });
    let table = tables.next()?;
    if tables.next().is_some() {
        return None;
    }
    Some(UntiedHead::of(head, table))
}

/// Every head a merge's output holds that `ckpt` ties, so that its `config.json` must untie
/// them: the heads `merged` from their table, and the adapter's full copies of a head (a
/// `modules_to_save` copy) among the tensors it `added` (`(name, shape)`), which a model
/// reads only once the config unties them (PEFT's merged save says
/// `tie_word_embeddings: false` for those too).
pub(crate) fn heads_to_untie<'a>(
    ckpt: &Checkpoint,
    merged: &[UntiedHead],
    added: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Vec<UntiedHead> {
    let copies = added
        .into_iter()
        .filter_map(|(name, dims)| tied_table(ckpt, name, |shape| shape == dims));
    merged.iter().cloned().chain(copies).collect()
}

/// Whether the checkpoint's `config.json` (beside its files) sets `tie_word_embeddings` to
/// `false`. A missing or unreadable file says nothing: a checkpoint without the head's
/// weight and with one table that fits it is tied.
fn config_unties(ckpt: &Checkpoint) -> bool {
    std::fs::read_to_string(ckpt.folder().join("config.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|config| config.get("tie_word_embeddings").and_then(Value::as_bool))
        == Some(false)
}

/// What an error about a missing head weight `head` adds when `head` is an output head:
/// how lorakit looks for the table a tied head reads.
pub(crate) fn missing_head_hint(head: &str) -> Option<String> {
    let module = head.strip_suffix(".weight")?;
    is_output_head(module).then(|| {
        format!(
            "; a head tied to the input embedding is merged into the embedding's table, but \
             the checkpoint has no single 2-D float tensor named like one ({}) of the head's \
             shape, or its config.json sets tie_word_embeddings to false",
            EMBEDDING_TABLE_ENDINGS.map(|e| format!("…{e}")).join(", ")
        )
    })
}

/// The warning a merge gives when it cannot untie a head it writes in a `config.json` (a
/// checkpoint given as a file, or a folder without one).
pub(crate) fn untie_by_hand_warning(untied: &UntiedHead) -> String {
    format!(
        "{} was tied to {}: the output holds it as a tensor of its own; set \
         tie_word_embeddings to false in the config.json it is used with, or transformers \
         ties the head back to the embedding and the head's adapter is lost",
        untied.head, untied.table
    )
}

/// PEFT's `ensure_weight_tying`: an adapter on a tied embedding also adapts the head tied
/// to it, with the embedding's factors (transposed, so the head's change is the
/// embedding's). PEFT takes the head out of the saved `target_modules` (it adapts it as the
/// embedding's partner) but stores its factors under the head's own name
/// (`lm_head.lora_A.weight` …). Adds each such head the file stores to the selector, so
/// that it applies as PEFT applies it: to a listed `target_modules` as a name, to a regex
/// one (which PEFT saves with the embedding's path added to it) as one more alternative;
/// the file's `target_modules` is written back as it was read. `all-linear` never reaches
/// a saved config (PEFT saves the layers it stands for). `low_rank_paths`: the module paths
/// the file stores a `lora_A` for.
pub(crate) fn target_tied_heads<'a>(
    config: &mut PeftConfig,
    low_rank_paths: impl Iterator<Item = &'a str>,
) {
    let ties = config
        .raw
        .get("ensure_weight_tying")
        .and_then(Value::as_bool);
    if ties != Some(true) {
        return;
    }
    let selector = &mut config.targets.target;
    let heads: Vec<String> = low_rank_paths
        .filter(|path| is_output_head(path) && !selector.matches(path))
        .map(str::to_string)
        .collect();
    if heads.is_empty() {
        return;
    }
    match selector {
        ModuleSelector::List(names) => names.extend(heads),
        ModuleSelector::Regex(pattern) => {
            let alternatives = std::iter::once(format!("(?:{})", pattern.as_str()))
                .chain(heads.iter().map(|head| regex::escape(head)));
            let wider = alternatives.collect::<Vec<_>>().join("|");
            // The file's pattern compiled; with escaped names added it still does.
            if let Ok(wider) = FullRegex::new(&wider, "target_modules") {
                *pattern = wider;
            }
        }
        ModuleSelector::AllLinear => {}
    }
}

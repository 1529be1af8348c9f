//! [`ModuleNames`]: how an adapter's module paths name a checkpoint's tensors. PEFT names
//! modules as the head model has them in transformers 5 (`transformer.h.0.attn.c_attn`,
//! `model.language_model.layers.0.self_attn.q_proj`); a checkpoint saved from the base
//! model alone (the Hub's `gpt2`) names the same weight `h.0.attn.c_attn.weight`, and an
//! image-and-text checkpoint stored in transformers 4.50's names (the Hub's Gemma 3 4B)
//! `language_model.model.layers.0.self_attn.q_proj.weight`; transformers loads both into
//! the head model all the same.

use crate::checkpoint::layout::{rebase, MODULE_PREFIXES, STORED_TEXT_DECODER, TEXT_DECODER};
use crate::checkpoint::Checkpoint;
use crate::peft::load::PeftAdapter;

/// The mapping between an adapter's module paths and a checkpoint's tensor names: prefix
/// rules `(adapter's prefix, checkpoint's prefix)`, none for the identity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ModuleNames {
    rules: Vec<(String, String)>,
}

impl ModuleNames {
    /// The mapping for `adapter` applied to `ckpt` (headers only): the stored
    /// image-and-text layout ([`MODULE_PREFIXES`]) when the checkpoint has its text decoder
    /// under `language_model.model` (and not under transformers 5's name too, which
    /// [`LlamaForCausalLM`](crate::models::llama::LlamaForCausalLM) would read); else dropping the head's prefix (e.g. `transformer.`)
    /// when every module the adapter stores sits under it, the checkpoint has no tensor
    /// under it, and the checkpoint has each module's weight without it; else the identity.
    pub(crate) fn of(adapter: &PeftAdapter, ckpt: &Checkpoint) -> Self {
        let has_under = |prefix: &str| {
            let dotted = format!("{prefix}.");
            ckpt.tensors().any(|(_, t)| t.name.starts_with(&dotted))
        };
        if has_under(STORED_TEXT_DECODER) && !has_under(TEXT_DECODER) {
            // Each module kind where the checkpoint has it: under transformers 5's name, a
            // stored one, or (absent, e.g. a tied head written untied) the stored name.
            let rules = MODULE_PREFIXES.iter().filter_map(|(current, stored)| {
                if has_under(current) {
                    return None;
                }
                let chosen = stored.iter().find(|s| has_under(s)).or(stored.first())?;
                Some((current.to_string(), chosen.to_string()))
            });
            return Self {
                rules: rules.collect(),
            };
        }
        let paths = adapter.module_paths();
        let Some((head, _)) = paths.first().and_then(|p| p.split_once('.')) else {
            return Self::default();
        };
        let bare = |p: &str| rebase(p, head, "");
        let all_under = paths.iter().all(|p| bare(p).is_some());
        let bare_weights_exist = paths
            .iter()
            .filter_map(|p| bare(p))
            .all(|p| ckpt.contains(&format!("{p}.weight")));
        if all_under && !has_under(head) && bare_weights_exist {
            Self {
                rules: vec![(head.to_string(), String::new())],
            }
        } else {
            Self::default()
        }
    }

    /// The checkpoint's name for the adapter's `name` (a module path, or a tensor under one).
    pub(crate) fn in_checkpoint(&self, name: &str) -> String {
        self.rules
            .iter()
            .find_map(|(adapter, stored)| rebase(name, adapter, stored))
            .unwrap_or_else(|| name.to_string())
    }

    /// The adapter's module path for the checkpoint's module path `path`.
    pub(crate) fn in_adapter(&self, path: &str) -> String {
        self.rules
            .iter()
            .find_map(|(adapter, stored)| rebase(path, stored, adapter))
            .unwrap_or_else(|| path.to_string())
    }
}

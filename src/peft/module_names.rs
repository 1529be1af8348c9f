//! [`ModuleNames`]: how an adapter's module paths name a checkpoint's tensors. PEFT names
//! modules as the head model has them (`transformer.h.0.attn.c_attn`); a checkpoint saved
//! from the base model alone (the Hub's `gpt2`) names the same weight
//! `h.0.attn.c_attn.weight`, and transformers loads it into the head model all the same.

use crate::checkpoint::Checkpoint;
use crate::peft::load::PeftAdapter;

/// The mapping between an adapter's module paths and a checkpoint's tensor names: the
/// identity, or dropping the head's prefix (e.g. `transformer.`) when every module the
/// adapter stores sits under it, the checkpoint has no tensor under it, and the
/// checkpoint has each module's weight without it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ModuleNames {
    /// The prefix (with its dot) the checkpoint's names lack.
    strip: Option<String>,
}

impl ModuleNames {
    /// The mapping for `adapter` applied to `ckpt` (headers only).
    pub(crate) fn of(adapter: &PeftAdapter, ckpt: &Checkpoint) -> Self {
        let paths = adapter.module_paths();
        let Some((head, _)) = paths.first().and_then(|p| p.split_once('.')) else {
            return Self::default();
        };
        let prefix = format!("{head}.");
        let bare = |p: &str| p.strip_prefix(&prefix).map(str::to_string);
        let all_under = paths.iter().all(|p| bare(p).is_some());
        let ckpt_has_prefix = ckpt.tensors().any(|(_, t)| t.name.starts_with(&prefix));
        let bare_weights_exist = paths
            .iter()
            .filter_map(|p| bare(p))
            .all(|p| ckpt.contains(&format!("{p}.weight")));
        if all_under && !ckpt_has_prefix && bare_weights_exist {
            Self {
                strip: Some(prefix),
            }
        } else {
            Self::default()
        }
    }

    /// The checkpoint's name for the adapter's `name` (a module path, or a tensor under one).
    pub(crate) fn in_checkpoint(&self, name: &str) -> String {
        match &self.strip {
            Some(prefix) => name
                .strip_prefix(prefix.as_str())
                .unwrap_or(name)
                .to_string(),
            None => name.to_string(),
        }
    }

    /// The adapter's module path for the checkpoint's module path `path`.
    pub(crate) fn in_adapter(&self, path: &str) -> String {
        match &self.strip {
            Some(prefix) => format!("{prefix}{path}"),
            None => path.to_string(),
        }
    }
}

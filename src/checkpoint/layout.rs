//! The two ways image-and-text checkpoints of the LLaVA kind (Gemma 3 4B and up: `model_type`
//! `gemma3`, `Gemma3ForConditionalGeneration`) name the same modules.
//!
//! transformers 5's modules — what PEFT 0.21's adapters name — sit under `model.` with the
//! text decoder at `model.language_model` and the head at `lm_head`; the checkpoints on the
//! Hub (and what `save_pretrained` still writes) keep transformers 4.50's names,
//! `language_model.model.…` and `language_model.lm_head`, and adapters made then do too.
//! transformers renames one into the other on load (its `conversion_mapping.py`, "llava"),
//! and PEFT renames an old adapter's keys the same way; lorakit uses [`MODULE_PREFIXES`] for
//! both.

/// Each module prefix as transformers 5 names it, and the names stored checkpoints (and
/// adapters made on transformers 4.50–4.51) give the same modules, most specific first. The
/// vision tower's SigLIP model drops its `vision_model` level in transformers 5.
///
/// ```
/// use lorakit::checkpoint::layout::{rebase, MODULE_PREFIXES};
/// let (current, stored) = MODULE_PREFIXES[0];
/// let path = "language_model.model.layers.3.self_attn.q_proj";
/// assert_eq!(rebase(path, stored[0], current).as_deref(), Some("model.language_model.layers.3.self_attn.q_proj"));
/// ```
pub const MODULE_PREFIXES: [(&str, &[&str]); 4] = [
    (TEXT_DECODER, &[STORED_TEXT_DECODER]),
    ("lm_head", &["language_model.lm_head"]),
    (
        "model.vision_tower",
        &["vision_tower.vision_model", "vision_tower"],
    ),
    ("model.multi_modal_projector", &["multi_modal_projector"]),
];

/// The prefix (transformers 5's name) of the text decoder of an image-and-text model.
pub const TEXT_DECODER: &str = "model.language_model";

/// The text decoder's prefix in stored checkpoints (transformers 4.50's name).
pub const STORED_TEXT_DECODER: &str = "language_model.model";

/// The prefixes (transformers 5's names) of the modules an image-and-text model has beside
/// its text decoder and head, which text input never reaches.
pub const VISION_MODULES: [&str; 2] = ["model.vision_tower", "model.multi_modal_projector"];

/// `path` moved from under the module prefix `from` to under `to`, matching whole path
/// components (`lm_head` and `lm_head.weight` match `lm_head`; `lm_headx` does not); `None`
/// when `path` is not under `from`. An empty prefix is the root.
///
/// ```
/// use lorakit::checkpoint::layout::rebase;
/// assert_eq!(rebase("lm_head.weight", "lm_head", "language_model.lm_head").as_deref(), Some("language_model.lm_head.weight"));
/// assert_eq!(rebase("lm_head", "lm_head", "language_model.lm_head").as_deref(), Some("language_model.lm_head"));
/// assert_eq!(rebase("lm_headx.weight", "lm_head", "x"), None);
/// assert_eq!(rebase("h.0.attn", "", "transformer").as_deref(), Some("transformer.h.0.attn"));
/// assert_eq!(rebase("transformer.h.0", "transformer", "").as_deref(), Some("h.0"));
/// ```
pub fn rebase(path: &str, from: &str, to: &str) -> Option<String> {
    let rest = if from.is_empty() {
        path
    } else if path == from {
        ""
    } else {
        path.strip_prefix(from)?.strip_prefix('.')?
    };
    Some(match (to.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_string(),
        (false, true) => to.to_string(),
        (false, false) => format!("{to}.{rest}"),
    })
}

/// `path` (a module path or a tensor under one) in transformers 5's names if it is under
/// one of the stored prefixes of [`MODULE_PREFIXES`]; otherwise unchanged.
///
/// ```
/// use lorakit::checkpoint::layout::current_name;
/// assert_eq!(current_name("vision_tower.vision_model.encoder.layers.0.mlp.fc1"), "model.vision_tower.encoder.layers.0.mlp.fc1");
/// assert_eq!(current_name("language_model.lm_head"), "lm_head");
/// assert_eq!(current_name("model.layers.0.mlp.fc1"), "model.layers.0.mlp.fc1");
/// ```
pub fn current_name(path: &str) -> String {
    MODULE_PREFIXES
        .iter()
        .find_map(|(current, stored)| stored.iter().find_map(|s| rebase(path, s, current)))
        .unwrap_or_else(|| path.to_string())
}

/// `path` (a module path or a tensor under one, in transformers 5's names) as stored
/// checkpoints name it: under the first stored prefix of its [`MODULE_PREFIXES`] entry
/// (transformers 4.50's name); unchanged when it is under none of them.
///
/// ```
/// use lorakit::checkpoint::layout::stored_name;
/// assert_eq!(stored_name("model.language_model.norm.weight"), "language_model.model.norm.weight");
/// assert_eq!(stored_name("lm_head.weight"), "language_model.lm_head.weight");
/// assert_eq!(stored_name("model.layers.0.mlp.fc1"), "model.layers.0.mlp.fc1");
/// ```
pub fn stored_name(path: &str) -> String {
    MODULE_PREFIXES
        .iter()
        .find_map(|(current, stored)| rebase(path, current, stored.first()?))
        .unwrap_or_else(|| path.to_string())
}

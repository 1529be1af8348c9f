//! Where transformers 5's stacked mixture-of-experts parameters sit in a checkpoint stored
//! expert by expert.
//!
//! transformers 5 holds a sparse block's experts as two stacked parameters,
//! `model.layers.N.mlp.experts.gate_up_proj` `(E, 2I, H)` (each expert's gate rows, then its
//! up rows) and `….experts.down_proj` `(E, H, I)`, and its router as
//! `model.layers.N.mlp.gate.weight`; PEFT's LoRA on parameters names those. The checkpoints
//! (the Hub's, and what `save_pretrained` writes) keep one tensor per expert:
//! `….mlp.experts.E.gate_proj.weight`, `up_proj`, `down_proj` (Qwen), or Mixtral's
//! `….block_sparse_moe.experts.E.w1.weight` (gate), `w3` (up), `w2` (down) and
//! `….block_sparse_moe.gate.weight`. [`stacked_part`] maps the second to the first.

/// The checkpoints' names of a sparse block and of its experts' gate, up and down
/// projections: Mixtral's (`block_sparse_moe`, `w1`, `w3`, `w2`), then the others' (`mlp`,
/// `gate_proj`, `up_proj`, `down_proj`).
pub const EXPERT_NAMES: [(&str, [&str; 3]); 2] = [
    ("block_sparse_moe", ["w1", "w3", "w2"]),
    ("mlp", ["gate_proj", "up_proj", "down_proj"]),
];

/// The parameters a module of transformers 5's sparse blocks registers that a LoRA can
/// target, in the order it registers them (which sets how PEFT nests its wrappers): the
/// experts' two stacks, the router's weight (`mlp.gate`; gpt-oss's `mlp.router`, whose
/// bias no LoRA targets); `None` for any other module path.
///
/// ```
/// use lorakit::checkpoint::stacked_params::registered_parameters;
/// assert_eq!(registered_parameters("model.layers.0.mlp.experts"), Some(&["gate_up_proj", "down_proj"][..]));
/// assert_eq!(registered_parameters("model.layers.0.mlp.gate"), Some(&["weight"][..]));
/// assert_eq!(registered_parameters("model.layers.0.mlp.router"), Some(&["weight"][..]));
/// assert_eq!(registered_parameters("model.layers.0.mlp.gate_proj"), None);
/// ```
pub fn registered_parameters(module: &str) -> Option<&'static [&'static str]> {
    if module.ends_with(".mlp.experts") {
        Some(&["gate_up_proj", "down_proj"])
    } else if module.ends_with(".mlp.gate") || module.ends_with(".mlp.router") {
        Some(&["weight"])
    } else {
        None
    }
}

/// Which rows of an expert's slice of a stacked parameter a stored tensor holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackedRows {
    /// All of them (`down_proj`, the router).
    All,
    /// The first half: the gate projection of `gate_up_proj`.
    Gate,
    /// The second half: the up projection of `gate_up_proj`.
    Up,
}

impl StackedRows {
    /// `(first row, rows)` of this part in a slice of `rows` rows.
    pub fn range(self, rows: usize) -> (usize, usize) {
        match self {
            Self::All => (0, rows),
            Self::Gate => (0, rows / 2),
            Self::Up => (rows / 2, rows - rows / 2),
        }
    }
}

/// A stored tensor's place in a stacked parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackedPart {
    /// transformers 5's module path (`model.layers.0.mlp.experts`, `….mlp.gate`).
    pub module: String,
    /// The parameter's name in it (`gate_up_proj`, `down_proj`, `weight`).
    pub param: &'static str,
    /// The expert (0 for the router).
    pub expert: usize,
    /// The rows of that expert's slice.
    pub rows: StackedRows,
}

/// The stacked parameter part the stored tensor `name` is, if it is an expert's or a
/// router's weight under a checkpoint's per-expert names.
///
/// ```
/// use lorakit::checkpoint::stacked_params::{stacked_part, StackedRows};
/// let w3 = stacked_part("model.layers.2.block_sparse_moe.experts.5.w3.weight").unwrap();
/// assert_eq!((w3.module.as_str(), w3.param, w3.expert, w3.rows),
///            ("model.layers.2.mlp.experts", "gate_up_proj", 5, StackedRows::Up));
/// let router = stacked_part("model.layers.0.mlp.gate.weight").unwrap();
/// assert_eq!((router.module.as_str(), router.param), ("model.layers.0.mlp.gate", "weight"));
/// assert!(stacked_part("model.layers.0.mlp.gate_proj.weight").is_none());
/// assert!(stacked_part("model.layers.0.mlp.experts.0.down_proj.bias").is_none());
/// ```
pub fn stacked_part(name: &str) -> Option<StackedPart> {
    let stem = name.strip_suffix(".weight")?;
    let (layer, rest) = EXPERT_NAMES
        .iter()
        .find_map(|(block, _)| stem.split_once(&format!(".{block}.")))?;
    if rest == "gate" {
        return Some(StackedPart {
            module: format!("{layer}.mlp.gate"),
            param: "weight",
            expert: 0,
            rows: StackedRows::All,
        });
    }
    let (expert, projection) = rest.strip_prefix("experts.")?.split_once('.')?;
    let expert = expert.parse().ok()?;
    let index = EXPERT_NAMES
        .iter()
        .find_map(|(_, names)| names.iter().position(|n| *n == projection))?;
    let (param, rows) = match index {
        0 => ("gate_up_proj", StackedRows::Gate),
        1 => ("gate_up_proj", StackedRows::Up),
        _ => ("down_proj", StackedRows::All),
    };
    Some(StackedPart {
        module: format!("{layer}.mlp.experts"),
        param,
        expert,
        rows,
    })
}

/// The `(module, parameter)` a stored tensor is when the checkpoint keeps a stacked
/// parameter whole, as gpt-oss's do: `….mlp.experts.gate_up_proj` and `….down_proj`
/// (`(E, in, out)`, transformers' transposed layout), `….mlp.router.weight` (`(E, hidden)`).
///
/// ```
/// use lorakit::checkpoint::stacked_params::stacked_whole;
/// assert_eq!(stacked_whole("model.layers.1.mlp.experts.down_proj"),
///            Some(("model.layers.1.mlp.experts".to_string(), "down_proj")));
/// assert_eq!(stacked_whole("model.layers.1.mlp.router.weight"),
///            Some(("model.layers.1.mlp.router".to_string(), "weight")));
/// assert_eq!(stacked_whole("model.layers.1.mlp.experts.down_proj_bias"), None);
/// ```
pub fn stacked_whole(name: &str) -> Option<(String, &'static str)> {
    let (module, param) = name.rsplit_once('.')?;
    let registered = registered_parameters(module)?;
    let param = registered.iter().find(|p| **p == param)?;
    let whole = match *param {
        "weight" => module.ends_with(".mlp.router"),
        _ => true,
    };
    whole.then(|| (module.to_string(), *param))
}

/// An adapter's module path without PEFT's `.base_layer` levels (the nesting of wrappers
/// on several parameters of one module).
///
/// ```
/// use lorakit::checkpoint::stacked_params::unwrapped;
/// assert_eq!(unwrapped("model.layers.0.mlp.experts.base_layer"), "model.layers.0.mlp.experts");
/// ```
pub fn unwrapped(path: &str) -> &str {
    let mut path = path;
    while let Some(inner) = path.strip_suffix(".base_layer") {
        path = inner;
    }
    path
}

//! PEFT's rules for which modules get an adapter, and with which rank and alpha.
//!
//! - `target_modules` as a list: a module matches if its path equals an entry or ends with
//!   `"." + entry`; as a string: a regex that must match the whole path; or `"all-linear"`:
//!   every linear layer except the model's output head.
//! - `exclude_modules` has the same list / regex forms and is checked first.
//! - `rank_pattern` / `alpha_pattern`: the first key, in order, for which the regex
//!   `(.*\.)?(key)$` matches the path (from its start) gives the module's value.

use regex::Regex;

use crate::frozen::BaseKind;

pub use crate::variants::build::ModuleSettings;

use crate::error::{Error, Result};

/// Which modules a rule selects.
#[derive(Clone, Debug)]
pub enum ModuleSelector {
    /// Exact names or `"." + name` suffixes.
    List(Vec<String>),
    /// A regex that must match the whole module path.
    Regex(FullRegex),
    /// Every linear layer (only valid as a target, not as an exclusion).
    AllLinear,
}

/// A regex compiled to match a whole string (Python's `re.fullmatch`).
#[derive(Clone, Debug)]
pub struct FullRegex {
    source: String,
    compiled: Regex,
}

impl FullRegex {
    /// Compiles `pattern` anchored at both ends. `what` names the setting in errors.
    pub fn new(pattern: &str, what: &'static str) -> Result<Self> {
        let compiled = Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
            Error::settings(
                "target rules",
                what,
                format!("regex `{pattern}` does not compile: {e}"),
            )
        })?;
        Ok(Self {
            source: pattern.to_string(),
            compiled,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `s` matches.
    pub fn is_match(&self, s: &str) -> bool {
        self.compiled.is_match(s)
    }
}

impl ModuleSelector {
    /// A list selector from names.
    pub fn list<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self::List(names.into_iter().map(Into::into).collect())
    }

    /// A full-match regex selector.
    pub fn regex(pattern: &str) -> Result<Self> {
        Ok(Self::Regex(FullRegex::new(pattern, "target_modules")?))
    }

    /// Whether `path` is selected (`AllLinear` selects every path; the head is excluded by
    /// [`TargetSpec`]).
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Self::List(names) => names.iter().any(|n| list_entry_matches(n, path)),
            Self::Regex(re) => re.is_match(path),
            Self::AllLinear => true,
        }
    }
}

/// PEFT's list rule: `path == entry` or `path` ends with `"." + entry`.
pub fn list_entry_matches(entry: &str, path: &str) -> bool {
    path == entry
        || (path.len() > entry.len()
            && path.ends_with(entry)
            && path.as_bytes().get(path.len() - entry.len() - 1) == Some(&b'.'))
}

/// Which linear layers of a model get an adapter.
///
/// ```
/// use lorakit::model::{ModuleSelector, TargetSpec};
/// # fn main() -> lorakit::Result<()> {
/// let spec = TargetSpec::new(ModuleSelector::list(["q_proj", "v_proj"]))
///     .exclude(ModuleSelector::list(["model.layers.1.self_attn.q_proj"]));
/// assert!(spec.is_target("model.layers.0.self_attn.q_proj"));
/// assert!(!spec.is_target("model.layers.1.self_attn.q_proj"));
/// assert!(!spec.is_target("model.layers.0.self_attn.xq_proj"));
/// let all = TargetSpec::new(ModuleSelector::AllLinear);
/// assert!(all.is_target("model.layers.0.mlp.up_proj") && !all.is_target("lm_head"));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct TargetSpec {
    /// The modules to adapt.
    pub target: ModuleSelector,
    /// Modules never adapted (checked first).
    pub exclude: Option<ModuleSelector>,
    /// The output head `AllLinear` leaves out (default `lm_head`), matched like a list entry.
    pub output_head: String,
    /// PEFT's `layers_to_transform` / `layers_pattern`: only these layer indexes are adapted
    /// (applies to list targets matched by suffix, as in PEFT).
    pub layers: Option<LayerFilter>,
    /// PEFT's `modules_to_save`: modules that get a fully trainable copy instead of an
    /// adapter (never adapted themselves).
    pub modules_to_save: Vec<String>,
}

/// PEFT's `layers_to_transform` with its `layers_pattern`: a module is adapted only if the
/// first numbered segment of its path (after `<pattern>.`, or after any segment when no
/// pattern is given) is one of `indexes`.
///
/// ```
/// use lorakit::model::LayerFilter;
/// # fn main() -> lorakit::Result<()> {
/// let f = LayerFilter::new(vec![0], vec!["layers".to_string()])?;
/// assert_eq!(f.layer_index("model.layers.0.self_attn.q_proj"), Some(0));
/// assert!(f.admits("model.layers.0.self_attn.q_proj"));
/// assert!(!f.admits("model.layers.1.self_attn.q_proj"));
/// assert!(!f.admits("lm_head")); // no layer index: not adapted
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LayerFilter {
    /// The layer indexes to adapt.
    pub indexes: Vec<usize>,
    patterns: Vec<(String, Regex)>,
}

impl LayerFilter {
    /// A filter on `indexes`, the index read after one of `patterns` (regexes, as PEFT's
    /// `layers_pattern`), or after any path segment when `patterns` is empty.
    pub fn new(indexes: Vec<usize>, patterns: Vec<String>) -> Result<Self> {
        let patterns = patterns
            .into_iter()
            .map(|p| {
                let re = Regex::new(&format!(r"^(?:|.*?\.)(?:{p})\.(\d+)\.")).map_err(|e| {
                    Error::settings(
                        "target rules",
                        "layers_pattern",
                        format!("`{p}` is not a valid regex: {e}"),
                    )
                })?;
                Ok((p, re))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { indexes, patterns })
    }

    /// The `layers_pattern` entries.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(|(p, _)| p.as_str())
    }

    /// The layer index PEFT reads from `path`, if any.
    pub fn layer_index(&self, path: &str) -> Option<usize> {
        let captures = if self.patterns.is_empty() {
            any_layer_index()?.captures(path)
        } else {
            self.patterns.iter().find_map(|(_, re)| re.captures(path))
        }?;
        captures.get(1)?.as_str().parse().ok()
    }

    /// Whether the module at `path` is in one of the listed layers.
    pub fn admits(&self, path: &str) -> bool {
        self.layer_index(path)
            .is_some_and(|i| self.indexes.contains(&i))
    }
}

/// PEFT's default layer-index rule: the first `.<segment>.<digits>.` of the path.
fn any_layer_index() -> Option<&'static Regex> {
    static RE: std::sync::OnceLock<Option<Regex>> = std::sync::OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^.*?\.[^.]*\.(\d+)\.").ok())
        .as_ref()
}

/// Whether the module at `path` is (inside) one of `modules_to_save`: PEFT copies every
/// module whose name ends with an entry, so the module or one of its ancestors must.
pub fn is_module_to_save(modules_to_save: &[String], path: &str) -> bool {
    let prefixes = path
        .match_indices('.')
        .filter_map(|(i, _)| path.get(..i))
        .chain(std::iter::once(path));
    prefixes
        .into_iter()
        .any(|p| modules_to_save.iter().any(|m| p.ends_with(m.as_str())))
}

impl TargetSpec {
    /// Targets from a selector, no exclusions, output head `lm_head`.
    pub fn new(target: ModuleSelector) -> Self {
        Self {
            target,
            exclude: None,
            output_head: "lm_head".to_string(),
            layers: None,
            modules_to_save: Vec::new(),
        }
    }

    /// Adapts only the layers `filter` admits (PEFT's `layers_to_transform`).
    pub fn layers(mut self, filter: LayerFilter) -> Self {
        self.layers = Some(filter);
        self
    }

    /// Gives these modules fully trainable copies (PEFT's `modules_to_save`).
    pub fn modules_to_save<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.modules_to_save = names.into_iter().map(Into::into).collect();
        self
    }

    /// Whether the module at `path` gets a trainable copy (PEFT's `modules_to_save`).
    pub fn is_module_to_save(&self, path: &str) -> bool {
        is_module_to_save(&self.modules_to_save, path)
    }

    /// Adds an exclusion rule.
    pub fn exclude(mut self, exclude: ModuleSelector) -> Self {
        self.exclude = Some(exclude);
        self
    }

    /// Sets the output head that `AllLinear` skips.
    pub fn output_head(mut self, name: impl Into<String>) -> Self {
        self.output_head = name.into();
        self
    }

    /// Whether the linear layer at `path` gets an adapter.
    pub fn is_target(&self, path: &str) -> bool {
        self.is_target_kind(path, BaseKind::Linear)
    }

    /// Whether the module at `path`, of `kind`, gets an adapter: PEFT's rules in PEFT's
    /// order (exclusions, `modules_to_save`, targets, then `layers_to_transform` for list
    /// entries matched as a suffix). `all-linear` selects no embedding.
    pub fn is_target_kind(&self, path: &str, kind: BaseKind) -> bool {
        if let Some(ex) = &self.exclude {
            if !matches!(ex, ModuleSelector::AllLinear) && ex.matches(path) {
                return false;
            }
        }
        if self
            .modules_to_save
            .iter()
            .any(|m| module_to_save_regex(m).is_some_and(|re| re.is_match(path)))
        {
            return false;
        }
        match &self.target {
            ModuleSelector::AllLinear => {
                kind != BaseKind::Embedding && !list_entry_matches(&self.output_head, path)
            }
            ModuleSelector::List(names) if names.iter().any(|n| n == path) => true,
            t @ ModuleSelector::List(_) => {
                t.matches(path) && self.layers.as_ref().is_none_or(|f| f.admits(path))
            }
            t => t.matches(path),
        }
    }
}

/// PEFT's rule keeping adapters off `modules_to_save` modules and their children:
/// `re.match(r"(^|.*\.)<m>($|\..*)", path)` (`None` if `m` is not a valid regex).
fn module_to_save_regex(m: &str) -> Option<Regex> {
    Regex::new(&format!(r"^(?:|.*\.)(?:{m})(?:$|\..*)")).ok()
}

/// An ordered `{key: value}` pattern table (PEFT's `rank_pattern` / `alpha_pattern`).
#[derive(Clone, Debug)]
pub struct Pattern<T> {
    entries: Vec<(String, Regex, T)>,
}

impl<T> Default for Pattern<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<T: Clone> Pattern<T> {
    /// Builds from `(key, value)` pairs in priority order. `what` names the setting in errors.
    pub fn new(pairs: impl IntoIterator<Item = (String, T)>, what: &'static str) -> Result<Self> {
        let mut entries = Vec::new();
        for (key, value) in pairs {
            let re = Regex::new(&format!(r"^(?:.*\.)?(?:{key})$")).map_err(|e| {
                Error::settings(
                    "target rules",
                    what,
                    format!("key `{key}` is not a valid regex: {e}"),
                )
            })?;
            entries.push((key, re, value));
        }
        Ok(Self { entries })
    }

    /// The value of the first key whose pattern matches `path`.
    pub fn lookup(&self, path: &str) -> Option<T> {
        self.entries
            .iter()
            .find(|(_, re, _)| re.is_match(path))
            .map(|(_, _, v)| v.clone())
    }

    /// The `(key, value)` pairs in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &T)> {
        self.entries.iter().map(|(k, _, v)| (k.as_str(), v))
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Rank and alpha for each module: defaults plus PEFT's patterns.
#[derive(Clone, Debug)]
pub struct RankAlpha {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub alpha: f64,
    /// Per-module ranks.
    pub rank_pattern: Pattern<usize>,
    /// Per-module alphas.
    pub alpha_pattern: Pattern<f64>,
}

impl RankAlpha {
    /// Defaults without patterns.
    pub fn new(r: usize, alpha: f64) -> Self {
        Self {
            r,
            alpha,
            rank_pattern: Pattern::default(),
            alpha_pattern: Pattern::default(),
        }
    }

    /// `(r, alpha)` for the module at `path`.
    pub fn for_module(&self, path: &str) -> ModuleSettings {
        ModuleSettings {
            r: self.rank_pattern.lookup(path).unwrap_or(self.r),
            alpha: self.alpha_pattern.lookup(path).unwrap_or(self.alpha),
        }
    }
}

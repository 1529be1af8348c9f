//! Training examples: token ids and which of them the loss counts, read from JSONL.
//!
//! A JSONL file holds one JSON object per line, in one of three forms (other keys are
//! ignored; blank lines are skipped):
//!
//! | form | tokens | trained |
//! |---|---|---|
//! | `{"text": str}` | `encode(text, true)` + EOS | all |
//! | `{"prompt": str, "completion": str}` | `encode(prompt, true)` + `encode(completion, false)` + EOS | completion and EOS |
//! | `{"input_ids": [u32], "trained": [bool]}` | as given | as given (`labels_mask` is the same key; all if absent) |
//!
//! EOS is the tokenizer's end-of-sequence token, when it has one. Every problem in a line
//! is an error that names the file and the line.
//!
//! ```
//! use lorakit::finetune::data::Dataset;
//! use lorakit::tokenizer::TextTokenizer;
//! # fn main() -> lorakit::Result<()> {
//! let tok = TextTokenizer::from_dir("tests/fixtures/tokenizer")?;
//! let data = Dataset::from_jsonl("tests/fixtures/finetune_data/mixed.jsonl", &tok)?;
//! let (train, eval) = data.split_eval(1, 0)?;
//! assert_eq!((train.len(), eval.len()), (data.len() - 1, 1));
//! train.check_vocab(tok.vocab_size())?;
//! # Ok(()) }
//! ```

use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Map, Value};

use super::jsonl::{array_field, id_list, string_field, Sourced};
use crate::error::{Error, Result, Scope};
use crate::tokenizer::TextTokenizer;

/// One training sequence: token ids and, per token, whether the loss predicts it.
///
/// ```
/// use lorakit::finetune::data::Example;
/// # fn main() -> lorakit::Result<()> {
/// let ex = Example::new(vec![1, 7, 8, 2], vec![false, false, true, true])?;
/// assert_eq!((ex.len(), ex.target_count()), (4, 2));
/// assert!(Example::new(vec![1, 7], vec![true]).is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The token ids.
    pub ids: Vec<u32>,
    /// Per token: whether the loss counts it as a prediction target.
    pub trained: Vec<bool>,
}

impl Example {
    /// An example from its ids and their trained flags.
    ///
    /// Errors: no ids, or not one flag per id.
    ///
    /// ```
    /// use lorakit::finetune::data::Example;
    /// # fn main() -> lorakit::Result<()> {
    /// assert_eq!(Example::new(vec![5], vec![true])?.ids, [5]);
    /// assert!(Example::new(vec![], vec![]).is_err());
    /// # Ok(()) }
    /// ```
    pub fn new(ids: Vec<u32>, trained: Vec<bool>) -> Result<Self> {
        Self::build(ids, trained).map_err(example_error)
    }

    /// `{"text": ...}`: `encode(text, true)` followed by the EOS id (if the tokenizer has
    /// one); every token trained.
    ///
    /// Errors: a text (and tokenizer) that gives no token at all.
    ///
    /// ```
    /// use lorakit::finetune::data::Example;
    /// use lorakit::tokenizer::TextTokenizer;
    /// # fn main() -> lorakit::Result<()> {
    /// let tok = TextTokenizer::from_dir("tests/fixtures/tokenizer")?;
    /// let ex = Example::text(&tok, "hello world")?;
    /// assert_eq!(ex.ids, [1, 51, 35, 45, 26, 20, 12, 2]); // <s> … </s>
    /// assert!(ex.trained.iter().all(|&t| t));
    /// # Ok(()) }
    /// ```
    pub fn text(tokenizer: &TextTokenizer, text: &str) -> Result<Self> {
        Self::from_text(tokenizer, text).map_err(example_error)
    }

    /// `{"prompt", "completion"}`: `encode(prompt, true)` + `encode(completion, false)` +
    /// EOS; the prompt's tokens are not trained, the completion's and EOS are.
    ///
    /// Errors: nothing to train (an empty completion and a tokenizer without EOS).
    ///
    /// ```
    /// use lorakit::finetune::data::Example;
    /// use lorakit::tokenizer::TextTokenizer;
    /// # fn main() -> lorakit::Result<()> {
    /// let tok = TextTokenizer::from_dir("tests/fixtures/tokenizer")?;
    /// let ex = Example::prompt_completion(&tok, "hello", " world")?;
    /// let prompt = tok.encode("hello", true)?.len();
    /// assert!(ex.trained.iter().take(prompt).all(|&t| !t));
    /// assert!(ex.trained.iter().skip(prompt).all(|&t| t));
    /// assert_eq!(ex.ids.last(), Some(&2));
    /// # Ok(()) }
    /// ```
    pub fn prompt_completion(
        tokenizer: &TextTokenizer,
        prompt: &str,
        completion: &str,
    ) -> Result<Self> {
        Self::from_prompt_completion(tokenizer, prompt, completion).map_err(example_error)
    }

    /// The number of tokens.
    ///
    /// ```
    /// # use lorakit::finetune::data::Example;
    /// # fn main() -> lorakit::Result<()> {
    /// assert_eq!(Example::new(vec![1, 2, 3], vec![true; 3])?.len(), 3);
    /// # Ok(()) }
    /// ```
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there is no token (never true of an example built by this module).
    ///
    /// ```
    /// # use lorakit::finetune::data::Example;
    /// # fn main() -> lorakit::Result<()> {
    /// assert!(!Example::new(vec![1], vec![true])?.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The tokens the loss counts: trained tokens at positions `>= 1` (nothing predicts
    /// the token at position 0).
    ///
    /// ```
    /// # use lorakit::finetune::data::Example;
    /// # fn main() -> lorakit::Result<()> {
    /// assert_eq!(Example::new(vec![1, 2, 3], vec![true; 3])?.target_count(), 2);
    /// # Ok(()) }
    /// ```
    pub fn target_count(&self) -> usize {
        self.trained.iter().skip(1).filter(|&&t| t).count()
    }

    fn build(ids: Vec<u32>, trained: Vec<bool>) -> std::result::Result<Self, String> {
        if ids.is_empty() {
            return Err("the example has no tokens".into());
        }
        if ids.len() != trained.len() {
            return Err(format!(
                "{} token ids but {} trained flags (one per token wanted)",
                ids.len(),
                trained.len()
            ));
        }
        Ok(Self { ids, trained })
    }

    fn from_text(tokenizer: &TextTokenizer, text: &str) -> std::result::Result<Self, String> {
        let mut ids = encode(tokenizer, text, true)?;
        ids.extend(tokenizer.eos_id());
        if ids.is_empty() {
            return Err("the text tokenizes to no tokens".into());
        }
        let trained = vec![true; ids.len()];
        Self::build(ids, trained)
    }

    fn from_prompt_completion(
        tokenizer: &TextTokenizer,
        prompt: &str,
        completion: &str,
    ) -> std::result::Result<Self, String> {
        let mut ids = encode(tokenizer, prompt, true)?;
        let prompt_len = ids.len();
        ids.extend(encode(tokenizer, completion, false)?);
        ids.extend(tokenizer.eos_id());
        if ids.len() == prompt_len {
            return Err(
                "the completion tokenizes to no tokens and the tokenizer has no end-of-sequence \
                 token: nothing to train"
                    .into(),
            );
        }
        let trained = (0..ids.len()).map(|i| i >= prompt_len).collect();
        Self::build(ids, trained)
    }
}

fn encode(
    tokenizer: &TextTokenizer,
    text: &str,
    special: bool,
) -> std::result::Result<Vec<u32>, String> {
    tokenizer
        .encode(text, special)
        .map_err(|e| format!("tokenizing failed: {e}"))
}

fn example_error(reason: String) -> Error {
    Error::usage(Scope::Settings("training example".into()), reason)
}

/// A list of training [`Example`]s, remembering the file line each was read from (for
/// errors).
///
/// ```
/// use lorakit::finetune::data::{Dataset, Example};
/// # fn main() -> lorakit::Result<()> {
/// let data = Dataset::from_examples(vec![
///     Example::new(vec![1, 4, 2], vec![true; 3])?,
///     Example::new(vec![1, 5, 6, 2], vec![false, false, true, true])?,
/// ]);
/// assert_eq!((data.len(), data.total_tokens()), (2, 7));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Dataset {
    examples: Sourced<Example>,
}

impl Dataset {
    /// Reads a JSONL file (the forms are in the [module docs](self)) through `tokenizer`.
    ///
    /// Errors, each naming the file and, for a line's problem, the 1-based line: a missing
    /// or unreadable file, a file with no example, a line that is not UTF-8 or not a JSON
    /// object, a line with none of the forms or with more than one, a `prompt` without
    /// `completion` (or the reverse), a value of the wrong type, `input_ids` and its flags
    /// of different lengths, and an example with no token or no trained token.
    ///
    /// ```
    /// use lorakit::finetune::data::Dataset;
    /// use lorakit::tokenizer::TextTokenizer;
    /// # fn main() -> lorakit::Result<()> {
    /// let tok = TextTokenizer::from_dir("tests/fixtures/tokenizer")?;
    /// let data = Dataset::from_jsonl("tests/fixtures/finetune_data/mixed.jsonl", &tok)?;
    /// assert!(!data.is_empty());
    /// let err = Dataset::from_jsonl("tests/fixtures/finetune_data/bad_json.jsonl", &tok);
    /// assert!(err.unwrap_err().to_string().contains("bad_json.jsonl: invalid JSON at line 2"));
    /// # Ok(()) }
    /// ```
    pub fn from_jsonl(path: impl AsRef<Path>, tokenizer: &TextTokenizer) -> Result<Self> {
        let examples = Sourced::read(path.as_ref(), |map| parse_line(map, tokenizer))?;
        Ok(Self { examples })
    }

    /// A dataset of examples built in code.
    ///
    /// ```
    /// use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let data = Dataset::from_examples(vec![Example::new(vec![3, 4], vec![true; 2])?]);
    /// assert_eq!(data.examples()[0].ids, [3, 4]);
    /// # Ok(()) }
    /// ```
    pub fn from_examples(examples: Vec<Example>) -> Self {
        Self {
            examples: Sourced::built(examples),
        }
    }

    /// The examples, in order.
    ///
    /// ```
    /// # use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let data = Dataset::from_examples(vec![Example::new(vec![3], vec![true])?]);
    /// assert_eq!(data.examples().len(), 1);
    /// # Ok(()) }
    /// ```
    pub fn examples(&self) -> &[Example] {
        &self.examples.items
    }

    /// The number of examples.
    ///
    /// ```
    /// # use lorakit::finetune::data::Dataset;
    /// assert_eq!(Dataset::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.examples.items.len()
    }

    /// Whether there is no example.
    ///
    /// ```
    /// # use lorakit::finetune::data::Dataset;
    /// assert!(Dataset::from_examples(vec![]).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.examples.items.is_empty()
    }

    /// The examples at `indices`, in that order (an index may repeat).
    ///
    /// Errors: an index out of range.
    ///
    /// ```
    /// # use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let data = Dataset::from_examples(vec![
    ///     Example::new(vec![3], vec![true])?,
    ///     Example::new(vec![4], vec![true])?,
    /// ]);
    /// assert_eq!(data.subset(&[1, 0])?.examples()[0].ids, [4]);
    /// assert!(data.subset(&[2]).is_err());
    /// # Ok(()) }
    /// ```
    pub fn subset(&self, indices: &[usize]) -> Result<Self> {
        Ok(Self {
            examples: self.examples.subset(indices)?,
        })
    }

    /// Shuffles the examples with `seed` and splits off `eval_count` of them: `(train,
    /// eval)`. Each part keeps the examples in their original relative order; the same
    /// `seed` gives the same split.
    ///
    /// Errors: `eval_count >= len()` (no example left to train on).
    ///
    /// ```
    /// # use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let data = Dataset::from_examples(
    ///     (0..10).map(|i| Example::new(vec![i], vec![true])).collect::<lorakit::Result<_>>()?,
    /// );
    /// let (train, eval) = data.split_eval(3, 42)?;
    /// assert_eq!((train.len(), eval.len()), (7, 3));
    /// assert!(data.split_eval(10, 42).is_err());
    /// # Ok(()) }
    /// ```
    pub fn split_eval(&self, eval_count: usize, seed: u64) -> Result<(Self, Self)> {
        let (train, eval) = split_indices(self.len(), eval_count, seed)?;
        Ok((self.subset(&train)?, self.subset(&eval)?))
    }

    /// Checks that every token id is below `vocab_size` (so a tokenizer that does not
    /// match the model is caught before training).
    ///
    /// Errors: the first example and token with an id `>= vocab_size`, and the file line
    /// the example was read from.
    ///
    /// ```
    /// # use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let data = Dataset::from_examples(vec![Example::new(vec![3, 70], vec![true; 2])?]);
    /// data.check_vocab(71)?;
    /// let err = data.check_vocab(64).unwrap_err().to_string();
    /// assert!(err.contains("example 0, token 1: id 70"), "{err}");
    /// # Ok(()) }
    /// ```
    pub fn check_vocab(&self, vocab_size: usize) -> Result<()> {
        self.examples
            .check_ids_below(|e| &e.ids, vocab_size, "vocabulary", "tokens")
    }

    /// The number of tokens of all examples.
    ///
    /// ```
    /// # use lorakit::finetune::data::{Dataset, Example};
    /// # fn main() -> lorakit::Result<()> {
    /// let data = Dataset::from_examples(vec![Example::new(vec![3, 4], vec![true; 2])?]);
    /// assert_eq!(data.total_tokens(), 2);
    /// # Ok(()) }
    /// ```
    pub fn total_tokens(&self) -> usize {
        self.examples().iter().map(Example::len).sum()
    }
}

/// Indices `(train, eval)` of `len` examples shuffled by `seed`, `eval_count` of them for
/// eval, each part in ascending order ([`Dataset::split_eval`]).
pub(crate) fn split_indices(
    len: usize,
    eval_count: usize,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if eval_count >= len {
        return Err(Error::settings(
            "eval split",
            "eval_count",
            format!("{eval_count} eval examples of {len} would leave none to train on"),
        ));
    }
    let order = shuffled_order(len, seed, SPLIT_STREAM);
    let (eval, train) = order.split_at(eval_count);
    let (mut eval, mut train) = (eval.to_vec(), train.to_vec());
    eval.sort_unstable();
    train.sort_unstable();
    Ok((train, eval))
}

/// The random stream [`Dataset::split_eval`] shuffles with (batches use the epoch's).
const SPLIT_STREAM: u64 = u64::MAX;

/// `0..n` shuffled by ChaCha8 seeded with `seed`, on stream `stream`.
pub(crate) fn shuffled_order(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

/// One JSONL line's example.
fn parse_line(
    map: &Map<String, Value>,
    tokenizer: &TextTokenizer,
) -> std::result::Result<Example, String> {
    let has = |key: &str| map.contains_key(key);
    let forms: Vec<&str> = [
        ("`text`", has("text")),
        ("`prompt`/`completion`", has("prompt") || has("completion")),
        ("`input_ids`", has("input_ids")),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    let example = match forms.as_slice() {
        [] => {
            return Err("no `text`, `prompt` + `completion` or `input_ids` key \
                        (other keys are ignored)"
                .to_string())
        }
        ["`text`"] => Example::from_text(tokenizer, string_field(map, "text")?)?,
        ["`input_ids`"] => pretokenized(map)?,
        [_] => {
            let pair_field = |key| match map.contains_key(key) {
                true => string_field(map, key),
                false => Err(format!(
                    "`{key}` is missing (`prompt` and `completion` go together)"
                )),
            };
            Example::from_prompt_completion(
                tokenizer,
                pair_field("prompt")?,
                pair_field("completion")?,
            )?
        }
        [first, rest @ ..] => {
            return Err(format!(
                "{first} and {} in one line: give one form per line",
                rest.join(" and ")
            ))
        }
    };
    if !example.trained.iter().any(|&t| t) {
        return Err("no token of this example is trained: the loss would never see it".to_string());
    }
    Ok(example)
}

/// `{"input_ids": [...], "trained" | "labels_mask": [...]}`.
fn pretokenized(map: &Map<String, Value>) -> std::result::Result<Example, String> {
    let ids = id_list(map, "input_ids")?;
    let key = match (map.contains_key("trained"), map.contains_key("labels_mask")) {
        (true, true) => return Err("both `trained` and `labels_mask`: give one".into()),
        (true, false) => Some("trained"),
        (false, true) => Some("labels_mask"),
        (false, false) => None,
    };
    let trained = match key {
        None => vec![true; ids.len()],
        Some(key) => array_field(map, key)?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_bool()
                    .ok_or_else(|| format!("`{key}`[{i}] must be true or false, got {v}"))
            })
            .collect::<std::result::Result<Vec<bool>, String>>()?,
    };
    Example::build(ids, trained)
}

/// Trains a small BPE tokenizer on `corpus` (no download needed), Llama-style: `<unk>` = 0,
/// `<s>` = 1, `</s>` = 2, lowercased text, `▁` for spaces (Metaspace), `<s>` prepended by
/// [`TextTokenizer::encode`] with special tokens, and BOS/EOS known. Deterministic: the
/// same corpus gives the same vocabulary.
///
/// The vocabulary holds the special tokens, every character of the (lowercased) corpus and
/// as many merges as fit in `vocab_size`; characters not in the corpus become `<unk>`.
///
/// Errors: a corpus of only whitespace, or one with more distinct characters than
/// `vocab_size - 3`.
///
/// Save it with the `tokenizers` crate's `save`, and a `tokenizer_config.json` naming the
/// special tokens so that [`TextTokenizer::from_dir`] finds them:
///
/// ```
/// use lorakit::finetune::data::tiny_tokenizer;
/// use lorakit::tokenizer::TextTokenizer;
/// # fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// let tok = tiny_tokenizer(&["hello world", "hello there, world"], 40)?;
/// assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
/// let ids = tok.encode("Hello world", true)?;
/// assert_eq!(ids.first(), Some(&1));
/// assert_eq!(tok.decode(&ids, true)?, "hello world");
///
/// let dir = std::env::temp_dir().join(format!("lorakit-tiny-tok-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// tok.inner().save(dir.join("tokenizer.json"), false)?;
/// std::fs::write(
///     dir.join("tokenizer_config.json"),
///     r#"{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}"#,
/// )?;
/// let back = TextTokenizer::from_dir(&dir)?;
/// assert_eq!(back.encode("Hello world", true)?, ids);
/// assert_eq!((back.bos_id(), back.eos_id()), (Some(1), Some(2)));
/// std::fs::remove_dir_all(&dir)?;
/// # Ok(()) }
/// ```
pub fn tiny_tokenizer(corpus: &[&str], vocab_size: usize) -> Result<TextTokenizer> {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::normalizers::Lowercase;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;

    const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];
    let fail =
        |field: &'static str, reason: String| Error::settings("tiny tokenizer", field, reason);
    let lib = |e: tokenizers::Error| fail("corpus", format!("the tokenizers crate failed: {e}"));
    if corpus.iter().all(|s| s.trim().is_empty()) {
        return Err(fail("corpus", "no text to learn a vocabulary from".into()));
    }
    let bpe = BPE::builder()
        .unk_token("<unk>".into())
        .build()
        .map_err(lib)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(Lowercase)).map_err(lib)?;
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, true)));
    tok.with_decoder(Some(Metaspace::new('▁', PrependScheme::First, true)));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(
            SPECIALS
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build()
        .into();
    tok.train(&mut trainer, corpus.iter().copied())
        .map_err(lib)?;
    let learned = tok.get_vocab_size(true);
    if learned > vocab_size {
        return Err(fail(
            "vocab_size",
            format!(
                "{vocab_size} is too small: the corpus has {} distinct characters, which \
                 with the 3 special tokens need {learned}",
                learned.saturating_sub(SPECIALS.len())
            ),
        ));
    }
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .and_then(|b| b.try_pair("<s> $A <s> $B"))
        .map_err(|e| fail("corpus", format!("post-processor template: {e}")))?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|e| fail("corpus", format!("post-processor: {e}")))?;
    tok.with_post_processor(Some(post));
    for (id, token) in (0u32..).zip(SPECIALS) {
        if tok.token_to_id(token) != Some(id) {
            return Err(fail("corpus", format!("`{token}` did not get id {id}")));
        }
    }
    Ok(
        TextTokenizer::from_tokenizer(tok, "tiny_tokenizer (trained in memory)")
            .with_bos(1)
            .with_eos(2),
    )
}

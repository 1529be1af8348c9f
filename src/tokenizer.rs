//! [`TextTokenizer`]: a Hugging Face `tokenizer.json` (read by the `tokenizers` crate) with
//! the model folder's special tokens, as the training loop and `lorakit generate` use it.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result, Scope};

/// A tokenizer read from a model folder's `tokenizer.json`, with its beginning- and
/// end-of-sequence tokens.
///
/// The ids of the special tokens come from `tokenizer_config.json` (`bos_token`,
/// `eos_token`: a string or an `AddedToken` object) when the folder has one, else from
/// `config.json` (`bos_token_id`, `eos_token_id`; the first of a list). Whether
/// [`encode`](Self::encode) adds them is the tokenizer's own post-processor's business
/// (Llama's adds `<s>`, GPT-2's adds nothing), as in transformers.
///
/// ```
/// use lorakit::tokenizer::TextTokenizer;
/// # fn main() -> lorakit::Result<()> {
/// // A byte-level BPE made by the `tokenizers` Python package (scripts/make_tokenizer_fixture.py).
/// let tok = TextTokenizer::from_dir("tests/fixtures/tokenizer")?;
/// let ids = tok.encode("hello world", false)?;
/// assert_eq!(tok.decode(&ids, true)?, "hello world");
/// assert!(tok.eos_id().is_some());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl TextTokenizer {
    /// Reads `dir/tokenizer.json` and the special tokens (see the type's docs).
    ///
    /// Errors: a missing or malformed `tokenizer.json` (the error names the file and what
    /// the `tokenizers` crate said), or a special token named in `tokenizer_config.json`
    /// that the tokenizer does not know.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join("tokenizer.json"))?;
        let special = SpecialTokens::read(dir)?;
        tok.bos_id = tok.resolve(&special.bos, "bos_token")?.or(special.bos_id);
        tok.eos_id = tok.resolve(&special.eos, "eos_token")?.or(special.eos_id);
        Ok(tok)
    }

    /// Reads one `tokenizer.json` file, with no special tokens known (set them with
    /// [`with_eos`](Self::with_eos) / [`with_bos`](Self::with_bos)).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(Error::usage(
                Scope::File(path.to_path_buf()),
                "no tokenizer file here (a model folder needs a `tokenizer.json`)",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            Error::usage(
                Scope::File(path.to_path_buf()),
                format!("not a tokenizer.json the `tokenizers` crate can read: {e}"),
            )
        })?;
        Ok(Self::from_tokenizer(inner, path))
    }

    /// Wraps a tokenizer built in code; `path` names it in errors.
    pub fn from_tokenizer(inner: tokenizers::Tokenizer, path: impl Into<PathBuf>) -> Self {
        Self {
            inner,
            path: path.into(),
            bos_id: None,
            eos_id: None,
        }
    }

    /// This tokenizer with `id` as its end-of-sequence token.
    pub fn with_eos(mut self, id: u32) -> Self {
        self.eos_id = Some(id);
        self
    }

    /// This tokenizer with `id` as its beginning-of-sequence token.
    pub fn with_bos(mut self, id: u32) -> Self {
        self.bos_id = Some(id);
        self
    }

    /// The token ids of `text`; `add_special_tokens` runs the tokenizer's post-processor
    /// (e.g. Llama's `<s>`), as transformers' `tokenizer(text)` does by default.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.error(format!("could not encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The token ids and token type ids of `text`, or of the pair `text`, `pair`, with the
    /// tokenizer's special tokens (BERT's `[CLS] text [SEP] pair [SEP]`, the pair's type ids
    /// 1), cut to at most `max_len` tokens as transformers' `truncation=True` cuts them
    /// (the longer of the pair first, special tokens kept): what a sequence classifier
    /// reads. Each call copies the tokenizer; for many texts, make the copy once with
    /// [`truncated_to`](Self::truncated_to) and call
    /// [`encode_with_types`](Self::encode_with_types).
    ///
    /// Errors: a `max_len` that leaves no room past the special tokens, or a text the
    /// tokenizer cannot encode.
    ///
    /// ```
    /// use lorakit::tokenizer::TextTokenizer;
    /// # fn main() -> lorakit::Result<()> {
    /// let tok = TextTokenizer::from_dir("tests/fixtures/tokenizer")?; // prepends <s> = 1
    /// let (ids, types) = tok.encode_truncated("hello world", None, 4)?;
    /// assert_eq!((ids.len(), ids[0]), (4, 1));
    /// assert_eq!(types, [0; 4]);
    /// assert!(tok.encode_truncated("hello", None, 1).is_err());
    /// # Ok(()) }
    /// ```
    pub fn encode_truncated(
        &self,
        text: &str,
        pair: Option<&str>,
        max_len: usize,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        self.truncated_to(max_len)?.encode_with_types(text, pair)
    }

    /// A copy of the tokenizer whose [`encode_with_types`](Self::encode_with_types) cuts to
    /// at most `max_len` tokens, special tokens included (transformers' `truncation=True`,
    /// `max_length=max_len`).
    ///
    /// Errors: a `max_len` that leaves no room past a single text's special tokens.
    pub fn truncated_to(&self, max_len: usize) -> Result<Self> {
        self.check_room(max_len, false)?;
        let mut copy = self.clone();
        copy.inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| self.error(format!("could not set truncation: {e}")))?;
        Ok(copy)
    }

    /// The token ids and token type ids of `text`, or of the pair `text`, `pair`, with the
    /// tokenizer's special tokens, cut as [`truncated_to`](Self::truncated_to) set (not at
    /// all otherwise).
    ///
    /// Errors: a pair whose special tokens leave no room within the truncation, or a text
    /// the tokenizer cannot encode.
    ///
    /// ```
    /// use lorakit::tokenizer::TextTokenizer;
    /// # fn main() -> lorakit::Result<()> {
    /// let tok = TextTokenizer::from_dir("tests/fixtures/tokenizer")?.truncated_to(6)?;
    /// let (ids, types) = tok.encode_with_types("hello world", Some("the lazy fox"))?;
    /// assert_eq!(ids.len(), 6);
    /// assert_eq!(types.len(), 6);
    /// # Ok(()) }
    /// ```
    pub fn encode_with_types(
        &self,
        text: &str,
        pair: Option<&str>,
    ) -> Result<(Vec<u32>, Vec<u32>)> {
        if let (Some(_), Some(t)) = (pair, self.inner.get_truncation()) {
            self.check_room(t.max_length, true)?;
        }
        let encoding = match pair {
            Some(pair) => self.inner.encode((text, pair), true),
            None => self.inner.encode(text, true),
        }
        .map_err(|e| self.error(format!("could not encode text: {e}")))?;
        Ok((
            encoding.get_ids().to_vec(),
            encoding.get_type_ids().to_vec(),
        ))
    }

    /// Errors unless `max_len` leaves room for text past the special tokens of a single
    /// text or (`pair`) a pair.
    fn check_room(&self, max_len: usize, pair: bool) -> Result<()> {
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, pair));
        if max_len <= added {
            return Err(self.error(format!(
                "max_len {max_len} leaves no room for text past the {added} special token(s)"
            )));
        }
        Ok(())
    }

    /// The text of `ids`, leaving special tokens out when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("could not decode ids: {e}")))
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of `token`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The beginning-of-sequence token's id, if known.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The end-of-sequence token's id, if known.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The file the tokenizer came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `tokenizers` crate's tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    fn error(&self, reason: String) -> Error {
        Error::usage(Scope::File(self.path.clone()), reason)
    }

    /// The id of a special token named in `tokenizer_config.json`.
    fn resolve(&self, token: &Option<String>, field: &str) -> Result<Option<u32>> {
        let Some(token) = token else { return Ok(None) };
        match self.token_id(token) {
            Some(id) => Ok(Some(id)),
            None => Err(self.error(format!(
                "tokenizer_config.json's {field} `{token}` is not in the vocabulary"
            ))),
        }
    }
}

/// The special tokens a model folder names.
#[derive(Default)]
struct SpecialTokens {
    bos: Option<String>,
    eos: Option<String>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl SpecialTokens {
    fn read(dir: &Path) -> Result<Self> {
        let mut out = SpecialTokens::default();
        if let Some(config) = read_json(&dir.join("tokenizer_config.json"))? {
            out.bos = token_string(config.get("bos_token"));
            out.eos = token_string(config.get("eos_token"));
        }
        if let Some(config) = read_json(&dir.join("config.json"))? {
            out.bos_id = token_id(config.get("bos_token_id"));
            out.eos_id = token_id(config.get("eos_token_id"));
        }
        Ok(out)
    }
}

/// A JSON file's contents, or `None` if there is no such file.
fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = crate::error::read_text(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::json(path, &e))
}

/// A special token as `tokenizer_config.json` writes it: a string, or an `AddedToken`
/// object with `content`.
fn token_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A token id as `config.json` writes it: a number, or a list whose first entry is used.
fn token_id(value: Option<&Value>) -> Option<u32> {
    let value = match value? {
        Value::Array(list) => list.first()?,
        v => v,
    };
    value.as_u64().and_then(|id| u32::try_from(id).ok())
}

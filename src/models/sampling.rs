//! Choosing the next token from a row of logits: greedy (argmax) or sampled with
//! temperature, top-k and top-p (nucleus) filtering, as transformers' `generate` applies
//! them (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, in that
//! order), from a seeded ChaCha8 generator so that a seed always gives the same tokens.
//!
//! The arithmetic runs on the CPU in f64 over the logits read back as f32, whatever the
//! model's dtype and device: one row of `vocab` values per generated token.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result, Scope};

/// The settings group named in errors.
const SETTINGS: &str = "sampling";

/// How the next token is chosen from a row of logits.
///
/// - `temperature == 0`: greedy, the most likely token (the first on ties); `top_k`,
///   `top_p` and `seed` are then unused (still checked).
/// - `temperature > 0`: a draw from `softmax(logits / temperature)`, restricted first to
///   the `top_k` largest logits (ties with the k-th kept, as transformers), then to the
///   smallest set of the most likely tokens whose probabilities sum to at least `top_p`
///   (always at least one token), renormalized.
///
/// Invalid settings are errors naming the setting ([`Sampling::validate`]): a negative or
/// non-finite temperature, `top_k = Some(0)`, `top_p` outside `(0, 1]`.
///
/// ```
/// use lorakit::models::sampling::Sampling;
/// let greedy = Sampling::default();
/// assert!(greedy.is_greedy());
/// let nucleus = Sampling { temperature: 0.7, top_p: Some(0.9), seed: 42, ..Sampling::default() };
/// assert!(!nucleus.is_greedy() && nucleus.validate().is_ok());
/// let bad = Sampling { top_p: Some(1.5), ..nucleus };
/// assert!(bad.validate().unwrap_err().to_string().contains("top_p"));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Divides the logits before the softmax; 0 is greedy.
    pub temperature: f64,
    /// Keep only the `k` largest logits (and ties with the k-th); `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probabilities reach `p`;
    /// `None` (or 1) keeps all.
    pub top_p: Option<f64>,
    /// Seeds the generator: the same seed, settings and logits give the same tokens.
    pub seed: u64,
}

impl Default for Sampling {
    /// Greedy ([`Sampling::greedy`]).
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampling {
    /// Greedy decoding: temperature 0, no filters, seed 0.
    ///
    /// ```
    /// use lorakit::models::sampling::Sampling;
    /// assert_eq!(Sampling::greedy(), Sampling { temperature: 0.0, top_k: None, top_p: None, seed: 0 });
    /// ```
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }

    /// Sampling at `temperature` with the generator seeded by `seed`, no filters.
    ///
    /// ```
    /// use lorakit::models::sampling::Sampling;
    /// let s = Sampling::with_temperature(0.8, 7);
    /// assert_eq!((s.temperature, s.seed, s.top_k, s.top_p), (0.8, 7, None, None));
    /// ```
    pub fn with_temperature(temperature: f64, seed: u64) -> Self {
        Self {
            temperature,
            seed,
            ..Self::greedy()
        }
    }

    /// Whether the next token is the argmax (temperature 0).
    ///
    /// ```
    /// use lorakit::models::sampling::Sampling;
    /// assert!(Sampling::greedy().is_greedy());
    /// assert!(!Sampling::with_temperature(1.0, 0).is_greedy());
    /// ```
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks the settings: temperature finite and ≥ 0, `top_k` ≥ 1, `top_p` in `(0, 1]`.
    /// The error names the setting and the value.
    ///
    /// ```
    /// use lorakit::models::sampling::Sampling;
    /// let err = Sampling::with_temperature(-1.0, 0).validate().unwrap_err().to_string();
    /// assert!(err.contains("temperature") && err.contains("-1"), "{err}");
    /// let err = Sampling { top_k: Some(0), ..Sampling::greedy() }.validate().unwrap_err();
    /// assert!(err.to_string().contains("top_k"));
    /// assert!(Sampling { top_p: Some(f64::NAN), ..Sampling::greedy() }.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Error::settings(
                SETTINGS,
                "temperature",
                format!("must be finite and ≥ 0 (0 is greedy), got {t}"),
            ));
        }
        if self.top_k == Some(0) {
            return Err(Error::settings(
                SETTINGS,
                "top_k",
                "must be at least 1 (or unset to keep every token), got 0",
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::settings(
                    SETTINGS,
                    "top_p",
                    format!("must be in (0, 1], got {p}"),
                ));
            }
        }
        Ok(())
    }
}

/// Picks tokens from logits rows by a [`Sampling`], drawing from its own seeded
/// ChaCha8 generator: one `Sampler` per generated sequence gives reproducible output.
///
/// ```
/// use lorakit::models::sampling::{Sampler, Sampling};
/// # fn main() -> lorakit::Result<()> {
/// let logits = [1.0f32, 3.0, 2.0, 3.0];
/// // Greedy: the first of the largest.
/// assert_eq!(Sampler::new(Sampling::greedy())?.sample_f32(&logits)?, 1);
/// // Sampled: the same seed gives the same draws.
/// let draws = |seed| -> lorakit::Result<Vec<u32>> {
///     let mut s = Sampler::new(Sampling::with_temperature(1.0, seed))?;
///     (0..20).map(|_| s.sample_f32(&logits)).collect()
/// };
/// assert_eq!(draws(1)?, draws(1)?);
/// assert_ne!(draws(1)?, draws(2)?);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `sampling` (checked: [`Sampling::validate`]), its generator seeded
    /// with `sampling.seed`.
    ///
    /// ```
    /// use lorakit::models::sampling::{Sampler, Sampling};
    /// assert!(Sampler::new(Sampling::with_temperature(0.5, 3)).is_ok());
    /// assert!(Sampler::new(Sampling::with_temperature(f64::INFINITY, 3)).is_err());
    /// ```
    pub fn new(sampling: Sampling) -> Result<Self> {
        sampling.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(sampling.seed);
        Ok(Self { sampling, rng })
    }

    /// The settings this sampler draws with.
    ///
    /// ```
    /// use lorakit::models::sampling::{Sampler, Sampling};
    /// # fn main() -> lorakit::Result<()> {
    /// assert!(Sampler::new(Sampling::greedy())?.sampling().is_greedy());
    /// # Ok(()) }
    /// ```
    pub fn sampling(&self) -> &Sampling {
        &self.sampling
    }

    /// The next token for a row of logits: a tensor of `vocab` values in any float dtype,
    /// on any device, of any shape with one row of values (`(vocab,)`, `(1, vocab)`,
    /// `(1, 1, vocab)`), read back to the CPU as f32.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use lorakit::models::sampling::{Sampler, Sampling};
    /// # fn main() -> lorakit::Result<()> {
    /// let row = Tensor::new(&[[0.5f32, -1.0, 4.0]], &Device::Cpu)?;
    /// assert_eq!(Sampler::new(Sampling::greedy())?.sample(&row)?, 2);
    /// # Ok(()) }
    /// ```
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let row = logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.sample_f32(&row)
    }

    /// [`Sampler::sample`] on a slice of logits. Greedy draws nothing from the generator;
    /// sampling draws one uniform number per token.
    ///
    /// Errors: an empty row, a NaN or `+∞` logit, or no finite logit at all (`-∞` marks a
    /// token as impossible).
    ///
    /// ```
    /// use lorakit::models::sampling::{Sampler, Sampling};
    /// # fn main() -> lorakit::Result<()> {
    /// let mut top1 = Sampler::new(Sampling { top_k: Some(1), ..Sampling::with_temperature(2.0, 9) })?;
    /// assert_eq!(top1.sample_f32(&[0.1, 0.2, 0.3, f32::NEG_INFINITY])?, 2); // only the argmax is left
    /// assert!(top1.sample_f32(&[0.1, f32::NAN]).is_err());
    /// assert!(top1.sample_f32(&[]).is_err());
    /// # Ok(()) }
    /// ```
    pub fn sample_f32(&mut self, logits: &[f32]) -> Result<u32> {
        check_row(logits)?;
        if self.sampling.is_greedy() {
            return argmax(logits);
        }
        let probs = filtered_probabilities(logits, &self.sampling)?;
        let u: f64 = self.rng.random();
        draw(&probs, u)
    }

    /// The distribution the next [`Sampler::sample_f32`] draws from: one probability per
    /// token (zero for filtered-out ones), summing to 1; for greedy, 1 at the argmax.
    /// Draws nothing from the generator.
    ///
    /// ```
    /// use lorakit::models::sampling::{Sampler, Sampling};
    /// # fn main() -> lorakit::Result<()> {
    /// let logits = [2.0f32, 1.0, 0.0, -1.0];
    /// let nucleus = Sampling { top_p: Some(0.8), ..Sampling::with_temperature(1.0, 0) };
    /// let p = Sampler::new(nucleus)?.probabilities(&logits)?;
    /// // softmax: 0.644, 0.237, 0.087, 0.032: the first two reach 0.8.
    /// assert!(p[0] > 0.7 && p[1] > 0.2 && p[2] == 0.0 && p[3] == 0.0);
    /// assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    /// # Ok(()) }
    /// ```
    pub fn probabilities(&self, logits: &[f32]) -> Result<Vec<f64>> {
        check_row(logits)?;
        if self.sampling.is_greedy() {
            let best = argmax(logits)?;
            return Ok((0..logits.len())
                .map(|i| {
                    if i as u64 == u64::from(best) {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect());
        }
        filtered_probabilities(logits, &self.sampling)
    }
}

/// A row of logits must be non-empty, free of NaN and `+∞`, with a finite value.
fn check_row(logits: &[f32]) -> Result<()> {
    let scope = || Scope::Settings(SETTINGS.to_string());
    if logits.is_empty() {
        return Err(Error::usage(scope(), "the logits row is empty"));
    }
    if let Some((i, v)) = logits
        .iter()
        .enumerate()
        .find(|(_, v)| v.is_nan() || **v == f32::INFINITY)
    {
        return Err(Error::usage(
            scope(),
            format!("logit {i} is {v}: the model's output is not a distribution"),
        ));
    }
    if !logits.iter().any(|v| v.is_finite()) {
        return Err(Error::usage(
            scope(),
            "every logit is -inf: no token is possible",
        ));
    }
    Ok(())
}

/// The index of the largest logit, the first on ties.
fn argmax(logits: &[f32]) -> Result<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    let (i, _) = best.ok_or_else(|| {
        Error::usage(
            Scope::Settings(SETTINGS.to_string()),
            "the logits row is empty",
        )
    })?;
    token(i)
}

fn token(i: usize) -> Result<u32> {
    u32::try_from(i).map_err(|_| {
        Error::usage(
            Scope::Settings(SETTINGS.to_string()),
            format!("token index {i} does not fit in u32"),
        )
    })
}

/// `softmax(logits / temperature)` over the top-k, then the top-p of that, renormalized
/// (f64; zero for the tokens filtered out). `sampling.temperature > 0`; the row is checked.
fn filtered_probabilities(logits: &[f32], sampling: &Sampling) -> Result<Vec<f64>> {
    let t = sampling.temperature;
    // Shifted by the largest logit first, so that a tiny temperature cannot overflow: the
    // largest scaled value is 0, the others ≤ 0 (-∞ where the logit is).
    let top = logits
        .iter()
        .map(|&v| f64::from(v))
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    let mut scaled: Vec<f64> = logits.iter().map(|&v| (f64::from(v) - top) / t).collect();
    if let Some(k) = sampling.top_k {
        if k < scaled.len() {
            let mut sorted = scaled.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            // Keep everything ≥ the k-th largest (ties with it kept, as transformers).
            if let Some(&kth) = sorted.get(k.saturating_sub(1)) {
                for v in scaled.iter_mut() {
                    if *v < kth {
                        *v = f64::NEG_INFINITY;
                    }
                }
            }
        }
    }
    let mut probs: Vec<f64> = scaled.iter().map(|&v| v.exp()).collect();
    normalize(&mut probs)?;
    if let Some(p) = sampling.top_p.filter(|&p| p < 1.0) {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        let prob = |i: usize| probs.get(i).copied().unwrap_or(0.0);
        // Most likely first; a stable sort keeps ties in index order.
        order.sort_by(|&a, &b| prob(b).total_cmp(&prob(a)));
        let mut keep = vec![false; probs.len()];
        let mut mass = 0.0;
        for &i in &order {
            if let (Some(k), Some(&q)) = (keep.get_mut(i), probs.get(i)) {
                *k = true;
                mass += q;
            }
            if mass >= p {
                break;
            }
        }
        for (q, k) in probs.iter_mut().zip(&keep) {
            if !k {
                *q = 0.0;
            }
        }
        normalize(&mut probs)?;
    }
    Ok(probs)
}

/// Scales `probs` to sum to 1.
fn normalize(probs: &mut [f64]) -> Result<()> {
    let total: f64 = probs.iter().sum();
    if !(total.is_finite() && total > 0.0) {
        return Err(Error::usage(
            Scope::Settings(SETTINGS.to_string()),
            format!("the filtered probabilities sum to {total}"),
        ));
    }
    probs.iter_mut().for_each(|q| *q /= total);
    Ok(())
}

/// The token whose cumulative probability (in index order) first exceeds `u ∈ [0, 1)`;
/// the last possible token if rounding leaves `u` above the total.
fn draw(probs: &[f64], u: f64) -> Result<u32> {
    let mut cumulative = 0.0;
    let mut last = None;
    for (i, &q) in probs.iter().enumerate() {
        if q <= 0.0 {
            continue;
        }
        cumulative += q;
        last = Some(i);
        if cumulative > u {
            return token(i);
        }
    }
    match last {
        Some(i) => token(i),
        None => Err(Error::usage(
            Scope::Settings(SETTINGS.to_string()),
            "no token has a non-zero probability",
        )),
    }
}

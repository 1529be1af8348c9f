//! Shared by the bad-input tests: a [`Checker`] that runs each case under `catch_unwind`, so
//! one panic or one wrong answer does not hide the others, and small constructors.
#![allow(dead_code)]

use std::fmt::Debug;
use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use lorakit::FrozenLinear;

/// Collects the outcome of many bad-input cases; [`Checker::finish`] fails the test with all
/// the problems found (panics, unexpected `Ok`s, messages missing the expected words).
#[derive(Default)]
pub struct Checker {
    failures: Vec<String>,
    cases: usize,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".to_string())
}

impl Checker {
    pub fn new() -> Self {
        Self::default()
    }

    /// `f` must return `Err` whose message contains every one of `needles`.
    pub fn err<T: Debug>(
        &mut self,
        what: &str,
        needles: &[&str],
        f: impl FnOnce() -> lorakit::Result<T>,
    ) {
        self.cases += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Err(p) => self
                .failures
                .push(format!("{what}: PANICKED: {}", panic_message(&*p))),
            Ok(Ok(v)) => self
                .failures
                .push(format!("{what}: expected an error, got Ok({v:?})")),
            Ok(Err(e)) => {
                let msg = e.to_string();
                let missing: Vec<&&str> = needles.iter().filter(|n| !msg.contains(**n)).collect();
                if !missing.is_empty() {
                    self.failures.push(format!(
                        "{what}: error message `{msg}` does not mention {missing:?}"
                    ));
                }
            }
        }
    }

    /// As [`Checker::err`], and the error must also be of the kind `kind` accepts (named
    /// `kind_name` in the failure), e.g. an `Error::Usage` rather than a config error.
    pub fn err_where<T: Debug>(
        &mut self,
        what: &str,
        needles: &[&str],
        kind_name: &str,
        kind: impl FnOnce(&lorakit::Error) -> bool,
        f: impl FnOnce() -> lorakit::Result<T>,
    ) {
        let mut wrong_kind = None;
        self.err(what, needles, || {
            f().map_err(|e| {
                if !kind(&e) {
                    wrong_kind = Some(format!("{e:?}"));
                }
                e
            })
        });
        if let Some(e) = wrong_kind {
            self.failures
                .push(format!("{what}: expected {kind_name}, got {e}"));
        }
    }

    /// `f` must return `Ok`; its value is returned for further checks.
    pub fn ok<T>(&mut self, what: &str, f: impl FnOnce() -> lorakit::Result<T>) -> Option<T> {
        match self.no_panic(what, f)? {
            Ok(v) => Some(v),
            Err(e) => {
                self.failures
                    .push(format!("{what}: expected Ok, got `{e}`"));
                None
            }
        }
    }

    /// `f` must not panic (for functions that return no `Result`).
    pub fn no_panic<T>(&mut self, what: &str, f: impl FnOnce() -> T) -> Option<T> {
        self.cases += 1;
        match catch_unwind(AssertUnwindSafe(f)) {
            Err(p) => {
                self.failures
                    .push(format!("{what}: PANICKED: {}", panic_message(&*p)));
                None
            }
            Ok(v) => Some(v),
        }
    }

    /// Records a failed plain check.
    pub fn check(&mut self, what: &str, ok: bool, detail: impl FnOnce() -> String) {
        self.cases += 1;
        if !ok {
            self.failures.push(format!("{what}: {}", detail()));
        }
    }

    /// Fails the test listing every problem found.
    pub fn finish(self) {
        eprintln!("bad-input cases checked: {}", self.cases);
        assert!(
            self.failures.is_empty(),
            "{} of {} bad-input case(s) failed:\n  - {}",
            self.failures.len(),
            self.cases,
            self.failures.join("\n  - ")
        );
    }
}

pub fn cpu() -> Device {
    Device::Cpu
}

/// A deterministic `(d_out, d_in)` tensor with small distinct values.
pub fn weight(d_out: usize, d_in: usize, dtype: DType) -> Tensor {
    let n = d_out * d_in;
    Tensor::arange(0f64, n as f64, &cpu())
        .and_then(|t| (t * 0.01)?.reshape((d_out, d_in))?.to_dtype(dtype))
        .expect("weight")
}

pub fn base(d_out: usize, d_in: usize) -> FrozenLinear {
    FrozenLinear::new(weight(d_out, d_in, DType::F32), None).expect("base")
}

pub fn base_dtype(d_out: usize, d_in: usize, dtype: DType) -> FrozenLinear {
    FrozenLinear::new(weight(d_out, d_in, dtype), None).expect("base")
}

pub fn input(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::ones(dims.to_vec(), dtype, &cpu()).expect("input")
}

/// A fresh var builder (its own VarMap) at `prefix`.
pub fn vb(prefix: &str) -> VarBuilder<'static> {
    VarBuilder::from_varmap(&VarMap::new(), DType::F32, &cpu()).pp(prefix)
}

pub fn tensor(values: &[f32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(values.to_vec(), dims.to_vec(), &cpu()).expect("tensor")
}

//! Helpers shared by the PEFT fixture, round-trip and CLI tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use lorakit::model::{linear_b, AdapterPlan, Linear};

pub fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(case)
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("read safetensors")
}

/// The fixture's model: linears at `layers[i].0` chained with ReLU between them.
pub struct Chain {
    pub layers: Vec<(String, Linear)>,
}

pub fn layer_specs(case: &str) -> Vec<(String, usize, usize, bool)> {
    let text = std::fs::read_to_string(fixture(case).join("model.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l[0].as_str().unwrap().to_string(),
                l[1].as_u64().unwrap() as usize,
                l[2].as_u64().unwrap() as usize,
                l[3].as_bool().unwrap(),
            )
        })
        .collect()
}

impl Chain {
    /// Builds the case's model from `base.safetensors` with the plan.
    pub fn build(case: &str, plan: &AdapterPlan) -> lorakit::Result<Self> {
        Self::build_dtype(case, plan, DType::F32)
    }

    pub fn build_dtype(case: &str, plan: &AdapterPlan, dtype: DType) -> lorakit::Result<Self> {
        let tensors = load(&fixture(case).join("base.safetensors"));
        let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
        let mut layers = Vec::new();
        for (path, d_in, d_out, bias) in layer_specs(case) {
            let l = linear_b(d_in, d_out, bias, vb.pp(&path), plan)?;
            layers.push((path, l));
        }
        Ok(Self { layers })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut x = x.clone();
        let n = self.layers.len();
        for (i, (_, l)) in self.layers.iter().enumerate() {
            x = l.forward(&x).unwrap();
            if i + 1 < n {
                x = x.relu().unwrap();
            }
        }
        x
    }
}

/// Every entry of `t`, flattened, in f64.
pub fn f64_values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// max |a − b| / max |b|, in f64.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (f64_values(a), f64_values(b));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-12);
    diff / scale
}

pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

/// A fresh empty directory under the system temp dir, removed with its contents when the
/// returned guard drops (a test that fails leaves it for inspection only until then).
pub fn temp_dir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("lorakit-test-{}-{name}", std::process::id()));
    if d.exists() {
        make_tree_writable(&d);
    }
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

/// A directory [`temp_dir`] made; it derefs to its path.
pub struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;

    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(&self.0).is_err() {
            // A test made part of it read-only: writable again, then removed.
            make_tree_writable(&self.0);
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `dir` and every folder below it writable by their owner.
fn make_tree_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_tree_writable(&entry.path());
        }
    }
}

/// The directory's entries, sorted (to compare before/after and spot temporaries).
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Checks the gradients of `loss` for every trainable tensor of `set` against PyTorch's in
/// `fx` (`grad.<lorakit's name>`, one per trainable tensor). Errors are relative to the
/// largest gradient of all: a key bias's gradient is zero up to rounding on both sides (a
/// per-row constant in the attention scores).
pub fn assert_pytorch_gradients(
    fx: &HashMap<String, Tensor>,
    loss: &Tensor,
    set: &lorakit::model::AdaptedSet,
) {
    let grads = loss.backward().unwrap();
    let vars = set.trainable_vars();
    let want: HashMap<&str, &Tensor> = fx
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("grad.").map(|name| (name, v)))
        .collect();
    assert_eq!(
        want.len(),
        vars.len(),
        "one PyTorch gradient per trainable tensor"
    );
    let scale = want.values().map(|g| max_abs(g)).fold(0f32, f32::max);
    for v in &vars {
        let name = v.full_name();
        let expected = want
            .get(name.as_str())
            .unwrap_or_else(|| panic!("no {name}"));
        let got = grads.get(v.var.var.as_tensor()).expect("a gradient");
        let err = max_abs(&(got - *expected).unwrap()) / scale;
        assert!(err < 1e-5, "{name}: off by {err:e} of the largest gradient");
    }
}

/// The largest absolute element of the f32 tensor `t`.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Each element's bits, whatever the float dtype.
pub fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits().into())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::BF16 => (t.to_vec1::<half::bf16>().unwrap().iter())
            .map(|v| v.to_bits().into())
            .collect(),
        DType::F16 => (t.to_vec1::<half::f16>().unwrap().iter())
            .map(|v| v.to_bits().into())
            .collect(),
        other => panic!("not a float dtype: {other:?}"),
    }
}

/// Asserts `got` equals `want` in dtype, shape and every element's bits.
pub fn assert_bit_identical(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (bits(got), bits(want));
    let differ = g.iter().zip(&w).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{what}: {differ} of {} elements differ", w.len());
}

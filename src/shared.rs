//! [`Shared`]: a cloneable handle to one adapted layer, so a model, a model-level registry
//! and training hooks (Delta-LoRA, AdaLoRA, LoRA-drop) can all reach the same layer.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::{Module, Tensor};

use crate::adapter::Adapter;

/// A shared, lockable adapted layer. Cloning shares the layer.
///
/// `Shared<LoraLinear>` converts into `Shared<dyn Adapter>` with [`Shared::erase`], so a
/// registry can hold layers of every variant while hooks keep their concrete type.
///
/// ```
/// use candle_core::{DType, Device, Module, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use lorakit::{Adapter, FrozenLinear, LoraConfig, LoraLinear, Shared};
/// # fn main() -> lorakit::Result<()> {
/// let dev = Device::Cpu;
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
/// let base = FrozenLinear::new(Tensor::ones((4, 4), DType::F32, &dev)?, None)?;
/// let layer = Shared::new(LoraLinear::new(base, &LoraConfig::new(2, 2.0), vb)?);
/// let in_registry: Shared<dyn Adapter> = layer.clone().erase();
/// in_registry.write().merge(true)?;
/// assert!(layer.read().is_merged());
/// let _y = layer.forward(&Tensor::ones((1, 4), DType::F32, &dev)?)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Shared<T: ?Sized>(Arc<RwLock<T>>);

impl<T: ?Sized> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T> Shared<T> {
    /// Wraps a layer.
    pub fn new(layer: T) -> Self {
        Self(Arc::new(RwLock::new(layer)))
    }
}

impl<T: Adapter + 'static> Shared<T> {
    /// The same layer as a `Shared<dyn Adapter>`.
    pub fn erase(self) -> Shared<dyn Adapter> {
        let inner: Arc<RwLock<dyn Adapter>> = self.0;
        Shared(inner)
    }
}

impl<T: ?Sized> Shared<T> {
    /// Read access. A lock poisoned by a panicking writer is recovered, not propagated.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Write access (merge, unmerge, weight updates).
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether two handles share one layer.
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl<T: Adapter + ?Sized> Module for Shared<T> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let layer = self.read();
        let train = layer.core().is_training();
        layer.forward_t(x, train).map_err(candle_core::Error::wrap)
    }
}

/// The names of `layers`, in order (for `Debug` output of hooks that hold layers).
pub(crate) fn layer_names(layers: &[Shared<dyn Adapter>]) -> Vec<String> {
    layers.iter().map(|l| l.read().name().to_string()).collect()
}

//! Saving and restoring a [`RankAllocator`]'s running state, so a training run resumed
//! from a checkpoint allocates ranks as the uninterrupted run would.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::{Ema, LayerStats, RankAllocator, RULE};
use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::train::hooks::{layer_as, layer_as_mut};
use crate::variants::adalora::AdaLoraLinear;

impl RankAllocator {
    /// The allocator's running state as named tensors: per layer `<layer>.<A|E|B>.ipt` and
    /// `.unc` (the sensitivity and uncertainty averages, once scores exist) and
    /// `<layer>.kept` (the rank mask, u8), plus `budget` and `final_mask_done`. Restore it
    /// into an allocator over the same layers with [`load_state`](Self::load_state).
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use lorakit::train::{train_step, RankAllocator, RankAllocatorConfig};
    /// use lorakit::{AdaLoraConfig, AdaLoraLinear, Adapter, FrozenLinear, Shared};
    /// # fn main() -> lorakit::Result<()> {
    /// let dev = Device::Cpu;
    /// let vars = VarMap::new();
    /// let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
    /// let base = FrozenLinear::new(Tensor::randn(0f32, 0.1, (4, 6), &dev)?, None)?;
    /// let layer = Shared::new(AdaLoraLinear::new(base, &AdaLoraConfig::new(4, 8.0), vb.pp("fc"))?).erase();
    /// let config = RankAllocatorConfig { target_r: 2, ..RankAllocatorConfig::new(10) };
    /// let mut alloc = RankAllocator::new(&[layer.clone()], config.clone())?;
    /// let mut opt = candle_nn::AdamW::new_lr(vars.all_vars(), 1e-2)?;
    /// let x = Tensor::randn(0f32, 1., (8, 6), &dev)?;
    /// for step in 1..=3 {
    ///     let loss = layer.read().forward_t(&x, true)?.sqr()?.mean_all()?;
    ///     train_step(&loss, &mut opt, &mut [&mut alloc], step)?;
    /// }
    /// let state = alloc.state_tensors()?;
    /// let mut resumed = RankAllocator::new(&[layer.clone()], config)?;
    /// resumed.load_state(&state.into_iter().collect())?;
    /// assert_eq!(resumed.triplet_scores()?, alloc.triplet_scores()?);
    /// assert_eq!(resumed.budget(), alloc.budget());
    /// # Ok(()) }
    /// ```
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let cpu = Device::Cpu;
        let mut out = vec![
            ("budget".to_string(), Tensor::new(self.budget as f64, &cpu)?),
            (
                "final_mask_done".to_string(),
                Tensor::new(u8::from(self.final_mask_done), &cpu)?,
            ),
        ];
        for (layer, stats) in self.layers.iter().zip(&self.stats) {
            let guard = layer.read();
            let l = layer_as::<AdaLoraLinear>(&*guard, RULE)?;
            let name = l.name().to_string();
            let kept: Vec<u8> = l.kept().iter().map(|&k| u8::from(k)).collect();
            out.push((format!("{name}.kept"), Tensor::new(kept, &cpu)?));
            if let Some(s) = stats {
                for (part, ema) in [("A", &s.a), ("E", &s.e), ("B", &s.b)] {
                    out.push((format!("{name}.{part}.ipt"), ema.ipt.clone()));
                    out.push((format!("{name}.{part}.unc"), ema.unc.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Restores what [`state_tensors`](Self::state_tensors) saved: the averages, the
    /// budget, and each layer's rank mask (re-applied to its `E`). Errors, naming the
    /// tensor, on one that is missing or of another shape.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: &str| {
            tensors.get(key).ok_or_else(|| Error::MissingKey {
                key: key.to_string(),
                file: "AdaLoRA allocator state".to_string(),
            })
        };
        let budget = crate::kernels::host_scalar(get("budget")?)?;
        let final_mask_done = get("final_mask_done")?
            .to_dtype(DType::U8)?
            .to_scalar::<u8>()?
            != 0;
        let mut stats = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let mut guard = layer.write();
            let l = layer_as_mut::<AdaLoraLinear>(&mut *guard, RULE)?;
            let name = l.name().to_string();
            let kept_key = format!("{name}.kept");
            let kept: Vec<bool> = get(&kept_key)?
                .to_dtype(DType::U8)?
                .to_vec1::<u8>()?
                .into_iter()
                .map(|k| k != 0)
                .collect();
            if kept.len() != l.kept().len() {
                return Err(shape_error(&kept_key, kept.len(), l.kept().len()));
            }
            l.apply_mask(&kept)?;
            let has_scores = tensors.contains_key(&format!("{name}.A.ipt"));
            let ema = |part: &str, like: &Tensor| -> Result<Ema> {
                let mut pair = [None, None];
                for (slot, what) in pair.iter_mut().zip(["ipt", "unc"]) {
                    let key = format!("{name}.{part}.{what}");
                    let t = get(&key)?;
                    if t.dims() != like.dims() {
                        return Err(Error::ShapeMismatch {
                            layer: name.clone(),
                            what: key,
                            expected: format!("{:?}", like.dims()),
                            got: format!("{:?}", t.dims()),
                        });
                    }
                    *slot = Some(t.to_dtype(DType::F32)?.to_device(like.device())?);
                }
                let [Some(ipt), Some(unc)] = pair else {
                    return Err(Error::MissingKey {
                        key: format!("{name}.{part}"),
                        file: "AdaLoRA allocator state".to_string(),
                    });
                };
                Ok(Ema { ipt, unc })
            };
            stats.push(if has_scores {
                Some(LayerStats {
                    a: ema("A", l.a().as_tensor())?,
                    e: ema("E", l.e().as_tensor())?,
                    b: ema("B", l.b().as_tensor())?,
                })
            } else {
                None
            });
        }
        self.stats = stats;
        self.budget = budget as usize;
        self.final_mask_done = final_mask_done;
        Ok(())
    }
}

fn shape_error(key: &str, got: usize, expected: usize) -> Error {
    Error::ShapeMismatch {
        layer: "AdaLoRA allocator state".to_string(),
        what: key.to_string(),
        expected: format!("[{expected}]"),
        got: format!("[{got}]"),
    }
}

//! [`NamedAdapters::load_peft`]: a PEFT adapter folder loaded under a name onto a model
//! that holds several adapters (PEFT's `load_adapter(dir, adapter_name=name)`).

use std::path::Path;

use candle_core::Device;

use crate::error::Result;
use crate::model::named::named_error;
use crate::model::{AdaptedSet, NamedAdapters};
use crate::peft::PeftAdapter;

impl NamedAdapters {
    /// Loads the PEFT adapter folder `dir` (any variant lorakit reads) under `name`
    /// (PEFT's `load_adapter(dir, adapter_name=name)`) with [`NamedAdapters::add`]; errors
    /// name the adapter. Returns its layers.
    pub fn load_peft(
        &self,
        name: &str,
        dir: impl AsRef<Path>,
        device: &Device,
    ) -> Result<AdaptedSet> {
        let plan = PeftAdapter::load(dir, device)
            .and_then(|a| a.plan())
            .map_err(|e| named_error(name, e.to_string()))?;
        self.add(name, &plan)
    }
}

//! Model checkpoints as users have them: a `.safetensors` file, a model folder, or a sharded
//! folder with `model.safetensors.index.json` ([`Checkpoint`]), read one tensor at a time
//! with positioned reads, and written one tensor at a time ([`ShardWriter`]).
//!
//! [`merge_checkpoint`](crate::peft::merge_checkpoint) builds on these to fold a PEFT
//! adapter into a checkpoint of any size in streaming memory; [`Checkpoint::var_builder`]
//! gives candle models (including unmodified `candle-transformers` ones) a `VarBuilder` over
//! a checkpoint, [`crate::peft::adapted_var_builder`] one with a PEFT adapter merged into each
//! weight as the model asks for it. MXFP4-packed expert weights (GPT-OSS's `X_blocks` and
//! `X_scales`) are dequantized as transformers does when a model asks for `X` ([`mxfp4`]).

pub mod backend;
pub mod bnb;
pub mod convert;
pub mod from_pickle;
pub mod header;
pub(crate) mod io;
pub mod layout;
pub mod mxfp4;
pub mod pickle;
pub mod source;
pub mod stacked_params;
pub mod writer;

pub use backend::{CheckpointBackend, TensorTransform};
pub use header::{SafetensorsHeader, StoredTensor};
pub use source::{Checkpoint, Given, Shard, INDEX_FILE, SINGLE_FILE};
pub use writer::ShardWriter;

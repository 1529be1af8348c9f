//! Batches of token ids and loss masks from a [`super::data::Dataset`].

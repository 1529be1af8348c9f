//! Training examples: token ids and which of them the loss counts, read from JSONL.

//! The fuzz targets' bodies, in [`exercise`]: each takes the fuzzer's bytes, runs one
//! lorakit entry point on them and checks the invariants that must hold whatever the
//! input (no panic; outputs complete or untouched). The crate's regression tests include
//! the same file (`tests/suite/fuzz_regressions.rs`), so a crash input replays exactly in CI.

pub mod exercise;

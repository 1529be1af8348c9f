//! lorakit's side of `benches/pissa_compare.py`: the base residuals PiSSA and OLoRA
//! adapters need (`lorakit::peft::BaseResidual::apply`), timed on the weights of a
//! safetensors file.
//!
//! `cargo bench --bench base_residual -- WEIGHTS R [OUT]` computes, for every 2-D tensor
//! of `WEIGHTS` (an `f32` `(out, in)` weight), the PiSSA and the OLoRA residual at rank `R`
//! (scale 1), each once (one call is what loading a module costs), and prints one JSON
//! object on its last line: per tensor, `pissa_s` and `olora_s` (wall seconds). With
//! `OUT`, the PiSSA residuals are written there (safetensors, same names) for the script
//! to check against an `f64` SVD. `RAYON_NUM_THREADS` sets the thread count.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use candle_core::{DType, Device};
use lorakit::frozen::FrozenLinear;
use lorakit::peft::BaseResidual;

fn main() {
    // `cargo bench` passes `--bench`; the arguments are the rest.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [weights, r, rest @ ..] = args.as_slice() else {
        eprintln!("usage: cargo bench --bench base_residual -- WEIGHTS R [OUT]");
        std::process::exit(2);
    };
    let r: usize = r.parse().expect("R: a rank");
    let tensors = candle_core::safetensors::load(weights, &Device::Cpu).expect("WEIGHTS");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (mut report, mut residuals) = (BTreeMap::new(), HashMap::new());
    for name in names {
        let w = &tensors[name];
        let base = || FrozenLinear::new(w.clone(), None).expect("a 2-D weight");
        let start = Instant::now();
        let pissa = BaseResidual::Pissa
            .apply(name, base(), r, 1.0)
            .expect("PiSSA");
        let pissa_s = start.elapsed().as_secs_f64();
        let start = Instant::now();
        BaseResidual::Olora
            .apply(name, base(), r, 1.0)
            .expect("OLoRA");
        let olora_s = start.elapsed().as_secs_f64();
        eprintln!(
            "{name} {:?}: PiSSA {pissa_s:.3} s, OLoRA {olora_s:.3} s",
            w.dims()
        );
        report.insert(
            name.clone(),
            serde_json::json!({"pissa_s": pissa_s, "olora_s": olora_s}),
        );
        residuals.insert(name.clone(), pissa.weight().to_dtype(DType::F32).unwrap());
    }
    if let Some(out) = rest.first() {
        candle_core::safetensors::save(&residuals, out).expect("OUT");
    }
    println!("{}", serde_json::to_string(&report).unwrap());
}

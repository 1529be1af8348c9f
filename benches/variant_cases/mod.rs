//! The variant cases shared by `variants.rs` (criterion) and `compare_json.rs` (JSON for
//! `peft_compare.py`), f32 on the CPU:
//! - one training step (forward, `sum`, backward) at n = 512, d = 1024: LoRA, DoRA and
//!   LoRA-FA at r = 16, VeRA at r = 256 (its default), and LoRA at r = 8 (PEFT's default);
//! - evaluation of one row at d = 2048, r = 16: the frozen base, LoRA and DoRA.
//!
//! Inputs of training steps are `Var`s, so backward computes `dx` as inside a network.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use lorakit::init::SeededRng;
use lorakit::{
    Adapter, DoraLinear, FrozenLinear, LoraConfig, LoraFaLinear, LoraInit, LoraLinear, VeraConfig,
    VeraLinear, VeraShared,
};

/// Rows, size and LoRA rank of the training-step cases.
pub const TRAIN: (usize, usize, usize) = (512, 1024, 16);
/// VeRA's rank in the training-step cases.
pub const VERA_R: usize = 256;
/// PEFT's default LoRA rank (`LoraConfig.r`), the rank of the `lora_r8` case.
pub const DEFAULT_R: usize = 8;

/// The rank of the training-step case `name` ([`TrainCases`]).
#[allow(dead_code)] // `variants.rs` labels by it; `compare_json.rs` keys cases by name only
pub fn train_rank(name: &str) -> usize {
    match name {
        "vera" => VERA_R,
        "lora_r8" => DEFAULT_R,
        _ => TRAIN.2,
    }
}
/// Size and rank of the one-row evaluation cases.
pub const EVAL: (usize, usize) = (2048, 16);

fn base(d: usize, rng: &mut SeededRng) -> FrozenLinear {
    let w = rng
        .uniform((d, d), -0.05, 0.05, DType::F32, &Device::Cpu)
        .unwrap();
    let b = rng.uniform(d, -0.1, 0.1, DType::F32, &Device::Cpu).unwrap();
    FrozenLinear::new(w, Some(b)).unwrap()
}

fn input(n: usize, d: usize, rng: &mut SeededRng) -> Var {
    Var::from_tensor(
        &rng.uniform((n, d), -1.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap(),
    )
    .unwrap()
}

fn lora_config(r: usize) -> LoraConfig {
    LoraConfig {
        init: LoraInit::BothRandom,
        ..LoraConfig::new(r, 2.0 * r as f64)
    }
}

fn vb(varmap: &VarMap) -> VarBuilder<'static> {
    VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu)
}

/// The training-step cases: the input and the named layers (`lora`, `lora_dropout` (LoRA
/// with dropout 0.1 on its input, in training mode), `dora`, `lora_fa`, `vera`, and
/// `lora_r8`: LoRA at PEFT's default rank, 8).
pub struct TrainCases {
    pub x: Var,
    pub layers: Vec<(&'static str, Box<dyn Adapter>)>,
    _varmap: VarMap,
}

impl TrainCases {
    pub fn new() -> Self {
        let (n, d, r) = TRAIN;
        let mut rng = SeededRng::new(0);
        let x = input(n, d, &mut rng);
        let varmap = VarMap::new();
        let lora = LoraLinear::new(base(d, &mut rng), &lora_config(r), vb(&varmap).pp("l"));
        let dropout_config = LoraConfig {
            dropout: 0.1,
            ..lora_config(r)
        };
        let lora_dropout =
            LoraLinear::new(base(d, &mut rng), &dropout_config, vb(&varmap).pp("ld"));
        let dora = DoraLinear::new(base(d, &mut rng), &lora_config(r), vb(&varmap).pp("d"));
        let fa = LoraFaLinear::new(base(d, &mut rng), &lora_config(r), vb(&varmap).pp("f"));
        let frozen = base(d, &mut rng);
        let shapes = [(frozen.d_in(), frozen.d_out())];
        let shared = VeraShared::covering(VERA_R, 0, shapes, DType::F32, &Device::Cpu).unwrap();
        let vera = VeraLinear::new(frozen, &VeraConfig::new(shared), vb(&varmap).pp("v")).unwrap();
        // Non-zero λ_b so the low-rank branch is not trivially zero.
        vera.lambda_b()
            .set(&Tensor::ones(d, DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let lora_r8 = LoraLinear::new(
            base(d, &mut rng),
            &lora_config(DEFAULT_R),
            vb(&varmap).pp("l8"),
        );
        let layers: Vec<(&'static str, Box<dyn Adapter>)> = vec![
            ("lora", Box::new(lora.unwrap())),
            ("lora_dropout", Box::new(lora_dropout.unwrap())),
            ("dora", Box::new(dora.unwrap())),
            ("lora_fa", Box::new(fa.unwrap())),
            ("vera", Box::new(vera)),
            ("lora_r8", Box::new(lora_r8.unwrap())),
        ];
        Self {
            x,
            layers,
            _varmap: varmap,
        }
    }

    /// One forward, `sum` and backward through `layer`.
    pub fn step(&self, layer: &dyn Adapter) {
        let y = layer.forward_t(self.x.as_tensor(), true).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        std::hint::black_box(grads);
    }
}

/// The one-row evaluation cases: `base`, `lora`, `dora` (DoRA prepared for inference).
pub struct EvalCases {
    pub x: Tensor,
    pub frozen: FrozenLinear,
    pub layers: Vec<(&'static str, Box<dyn Adapter>)>,
    _varmap: VarMap,
}

impl EvalCases {
    pub fn new() -> Self {
        let (d, r) = EVAL;
        let mut rng = SeededRng::new(1);
        let x = input(1, d, &mut rng).as_tensor().detach();
        let varmap = VarMap::new();
        let frozen = base(d, &mut rng);
        let lora = LoraLinear::new(frozen.clone(), &lora_config(r), vb(&varmap).pp("l")).unwrap();
        let dora = DoraLinear::new(frozen.clone(), &lora_config(r), vb(&varmap).pp("d")).unwrap();
        dora.prepare_for_inference().unwrap();
        Self {
            x,
            frozen,
            layers: vec![("lora", Box::new(lora)), ("dora", Box::new(dora))],
            _varmap: varmap,
        }
    }

    /// The frozen base alone.
    pub fn base(&self) {
        std::hint::black_box(self.frozen.forward_checked("base", &self.x).unwrap());
    }

    /// `layer` in evaluation mode.
    pub fn eval(&self, layer: &dyn Adapter) {
        std::hint::black_box(layer.forward_t(&self.x, false).unwrap());
    }
}

//! [`LlamaFamily`]: the architectures the Llama-family decoder implements, by `model_type`.

/// The `model_type` of Gemma 3's image-and-text checkpoints (`Gemma3ForConditionalGeneration`,
/// Gemma 3 4B and up), read for their text decoder.
pub const GEMMA3_MULTIMODAL: &str = "gemma3";

/// The architectures [`super::LlamaForCausalLM`] implements, by transformers' `model_type`.
/// They differ only in defaults and a few switches (see [`super::LlamaConfig`]).
///
/// ```
/// use lorakit::models::llama::LlamaFamily;
/// assert_eq!(LlamaFamily::from_model_type("qwen2"), Some(LlamaFamily::Qwen2));
/// assert_eq!(LlamaFamily::Qwen2.model_type(), "qwen2");
/// assert_eq!(LlamaFamily::from_model_type("gpt2"), None);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LlamaFamily {
    /// `llama`: Llama 2 / 3 / 3.x, TinyLlama, SmolLM (`attention_bias`, `mlp_bias`).
    Llama,
    /// `mistral`: no biases; `sliding_window` on every layer when set.
    Mistral,
    /// `qwen2`: Qwen2 / Qwen2.5, bias on q/k/v (not o); per-layer sliding window.
    Qwen2,
    /// `qwen3`: RMSNorm over `head_dim` on queries and keys (`q_norm`, `k_norm`),
    /// `attention_bias` on q/k/v/o; per-layer sliding window.
    Qwen3,
    /// `granite`: IBM's Granite 3.x, a Llama decoder with four scalars
    /// ([`super::Multipliers`]). transformers has no sequence classifier for it.
    Granite,
    /// `smollm3`: Hugging Face's SmolLM3, with layers that skip RoPE (NoPE,
    /// `no_rope_layers`), `attention_bias` on q/k/v/o and `mlp_bias`, per-layer sliding
    /// window as Qwen's, θ 2 000 000 and tied embeddings by default.
    SmolLm3,
    /// `phi3`: Microsoft's Phi-3, Phi-3.5 and Phi-4, with fused projections (`qkv_proj`,
    /// `gate_up_proj`: PEFT targets them under those names), a window on every layer when
    /// `sliding_window` is set, RMSNorm ε 1e-5 by default, `su` / `yarn` RoPE read as
    /// LongRoPE ([`super::LongRopeScaling`]), and a `partial_rotary_factor` below 1 (Phi-4-mini:
    /// RoPE on the first part of each head only).
    Phi3,
    /// `gemma`: Google's Gemma (1), the plain Gemma decoder: RMSNorms that multiply by
    /// `1 + weight`, a GELU-tanh gate (`hidden_act`; its legacy `gelu` read as the tanh
    /// approximation, as transformers reads it), embeddings times `√hidden_size`, tied
    /// embeddings, `head_dim` 256 by default.
    Gemma,
    /// `gemma2`: Gemma 2, as Gemma with a norm after attention and around the MLP as well
    /// as before ([`NormPlacement::Sandwich`](super::NormPlacement::Sandwich)), attention scale `query_pre_attn_scalar^-½`, every
    /// other layer sliding (the first one first), and soft-capped attention scores (50) and
    /// logits (30) by default.
    Gemma2,
    /// `gemma3_text`: Google's Gemma 3 text decoder (`Gemma3ForCausalLM`: Gemma 3 1B, and
    /// the text part of the larger ones saved alone; and the text decoder of `gemma3`,
    /// `Gemma3ForConditionalGeneration`: Gemma 3 4B and up). RMSNorms that multiply by
    /// `1 + weight`, a norm after attention and around the MLP as well as before
    /// ([`NormPlacement::Sandwich`](super::NormPlacement::Sandwich)), Qwen3's q/k norms, a `gelu_pytorch_tanh` gate, embeddings times
    /// `√hidden_size`, attention scale `query_pre_attn_scalar^-½`, sliding layers (five of
    /// every six by default) with their own RoPE θ, tied embeddings by default. Logit
    /// soft-capping is read as Gemma 2's (none by default); bidirectional attention is
    /// refused.
    Gemma3,
    /// `olmo2`: AllenAI's OLMo 2 (`Olmo2ForCausalLM`): no norm before attention or the MLP,
    /// a norm after each instead ([`NormPlacement::Post`](super::NormPlacement::Post)),
    /// RMSNorm over the whole query and key projections ([`QkNorm::Whole`](super::QkNorm::Whole))
    /// before they are split into heads, norms multiplied in f32, `attention_bias` on
    /// q/k/v/o, ε 1e-5 by default.
    Olmo2,
    /// `olmo3`: AllenAI's OLMo 3 (`Olmo3ForCausalLM`): OLMo 2 with sliding layers (three in
    /// four by default, window 4096) and RoPE per layer type (scaling, e.g. YaRN, on the
    /// full-attention layers only), θ 500 000 by default.
    Olmo3,
    /// `mixtral`: Mistral AI's Mixtral, a Mistral decoder whose MLP is a sparse mixture of
    /// experts ([`MoeConfig`](super::MoeConfig)): a router picks `num_experts_per_tok` of
    /// `num_local_experts` experts per token, their weights renormalized over the chosen
    /// ones; no window unless `sliding_window` is set, θ 1 000 000, ε 1e-5 by default.
    Mixtral,
    /// `qwen2_moe`: Qwen1.5-MoE / Qwen2-MoE, Qwen2's attention (`qkv_bias`, default on) with
    /// a sparse mixture of experts beside a shared expert gated by a sigmoid
    /// (`shared_expert`, `shared_expert_gate`), on the layers `decoder_sparse_step` and
    /// `mlp_only_layers` leave sparse.
    Qwen2Moe,
    /// `qwen3_moe`: Qwen3's MoE models (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder), Qwen3's
    /// attention (per-head q/k norms) with a sparse mixture of experts; a window on every
    /// layer when `use_sliding_window`.
    Qwen3Moe,
    /// `olmoe`: AllenAI's OLMoE, pre-norm layers with RMSNorm over the whole query and key
    /// projections, an optional `clip_qkv` clamp on queries, keys and values, and a sparse
    /// mixture of experts (64, 8 per token, not renormalized, by default) in every layer.
    /// transformers has no sequence classifier for it.
    Olmoe,
    /// `gpt_oss`: OpenAI's gpt-oss (gpt-oss-20b, gpt-oss-120b): biased attention with a
    /// learned sink logit per head, sliding and full layers alternating (the first one
    /// sliding, window 128), YaRN RoPE, RMSNorms multiplied in f32, and in every layer a
    /// sparse mixture of experts with a biased router (softmax over the chosen experts'
    /// logits) and biased experts stored stacked, each a clamped SwiGLU over interleaved
    /// gate and up columns ([`ClampedSwiGlu`](super::ClampedSwiGlu)).
    GptOss,
}

impl LlamaFamily {
    /// Every family, in the order errors list them.
    pub const ALL: [LlamaFamily; 17] = [
        Self::Llama,
        Self::Mistral,
        Self::Qwen2,
        Self::Qwen3,
        Self::Granite,
        Self::SmolLm3,
        Self::Phi3,
        Self::Gemma,
        Self::Gemma2,
        Self::Gemma3,
        Self::Olmo2,
        Self::Olmo3,
        Self::Mixtral,
        Self::Qwen2Moe,
        Self::Qwen3Moe,
        Self::Olmoe,
        Self::GptOss,
    ];

    /// The `model_type`s of the families `which` admits, comma-separated (for errors).
    ///
    /// ```
    /// use lorakit::models::llama::LlamaFamily;
    /// let types = LlamaFamily::model_types(|f| f.is_gemma());
    /// assert_eq!(types, "gemma, gemma2, gemma3_text");
    /// ```
    pub fn model_types(which: impl Fn(LlamaFamily) -> bool) -> String {
        let types: Vec<&str> = Self::ALL
            .into_iter()
            .filter(|&f| which(f))
            .map(Self::model_type)
            .collect();
        types.join(", ")
    }

    /// The `model_type` transformers writes for it.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaFamily;
    /// assert_eq!(LlamaFamily::Mistral.model_type(), "mistral");
    /// ```
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "llama",
            LlamaFamily::Mistral => "mistral",
            LlamaFamily::Qwen2 => "qwen2",
            LlamaFamily::Qwen3 => "qwen3",
            LlamaFamily::Granite => "granite",
            LlamaFamily::SmolLm3 => "smollm3",
            LlamaFamily::Phi3 => "phi3",
            LlamaFamily::Gemma => "gemma",
            LlamaFamily::Gemma2 => "gemma2",
            LlamaFamily::Gemma3 => "gemma3_text",
            LlamaFamily::Olmo2 => "olmo2",
            LlamaFamily::Olmo3 => "olmo3",
            LlamaFamily::Mixtral => "mixtral",
            LlamaFamily::Qwen2Moe => "qwen2_moe",
            LlamaFamily::Qwen3Moe => "qwen3_moe",
            LlamaFamily::Olmoe => "olmoe",
            LlamaFamily::GptOss => "gpt_oss",
        }
    }

    /// The family of a `model_type`, if it is one of the seventeen, or `gemma3` (Gemma 3's image
    /// and text checkpoints, whose text decoder is Gemma 3's: see
    /// [`LlamaConfig::multimodal`](super::LlamaConfig::multimodal)).
    ///
    /// ```
    /// use lorakit::models::llama::LlamaFamily;
    /// assert_eq!(LlamaFamily::from_model_type("qwen3"), Some(LlamaFamily::Qwen3));
    /// assert_eq!(LlamaFamily::from_model_type("Qwen3"), None); // as transformers writes it
    /// assert_eq!(LlamaFamily::from_model_type("gemma3"), Some(LlamaFamily::Gemma3));
    /// ```
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        if model_type == GEMMA3_MULTIMODAL {
            return Some(Self::Gemma3);
        }
        Self::ALL.into_iter().find(|f| f.model_type() == model_type)
    }
}

impl LlamaFamily {
    /// Gemma, Gemma 2 or Gemma 3: the families whose norms multiply by `1 + weight` and
    /// whose embeddings are scaled by `√hidden_size`.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaFamily;
    /// assert!(LlamaFamily::Gemma2.is_gemma() && !LlamaFamily::Llama.is_gemma());
    /// ```
    pub fn is_gemma(self) -> bool {
        matches!(self, Self::Gemma | Self::Gemma2 | Self::Gemma3)
    }

    /// Whether transformers multiplies its RMSNorms' weights in f32 (the Gemma families,
    /// OLMo 2 and 3, gpt-oss) rather than in the input's dtype: the weight is kept in f32 for a
    /// half-precision model.
    ///
    /// ```
    /// use lorakit::models::llama::LlamaFamily;
    /// assert!(LlamaFamily::Olmo2.norms_in_f32() && !LlamaFamily::Qwen3.norms_in_f32());
    /// ```
    pub fn norms_in_f32(self) -> bool {
        self.is_gemma() || matches!(self, Self::Olmo2 | Self::Olmo3 | Self::GptOss)
    }

    /// Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE or gpt-oss: the families whose MLPs are (or may be) sparse
    /// mixtures of experts ([`MoeConfig`](super::MoeConfig)).
    ///
    /// ```
    /// use lorakit::models::llama::LlamaFamily;
    /// assert!(LlamaFamily::Mixtral.is_moe() && !LlamaFamily::Mistral.is_moe());
    /// ```
    pub fn is_moe(self) -> bool {
        matches!(
            self,
            Self::Mixtral | Self::Qwen2Moe | Self::Qwen3Moe | Self::Olmoe | Self::GptOss
        )
    }
}

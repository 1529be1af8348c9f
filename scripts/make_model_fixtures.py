#!/usr/bin/env python3
"""Generates the Llama-family model fixtures under tests/fixtures/models/llama/: tiny random
transformers decoders for the configurations the checkpoint and option fixtures do not
cover, a LoRA adapter on each, and the logits transformers and PEFT compute. They check
`lorakit::models::llama` (tests/suite/models_llama.rs).

Usage:
    python3 scripts/make_model_fixtures.py
        removes and rewrites tests/fixtures/models/llama/ (only that folder: other
        models' fixtures live beside it in tests/fixtures/models/)

Cases (all f32, vocab 64, 2 layers, built from configs, no downloads; each seeds torch
itself):
    mistral        MistralForCausalLM, hidden 32, 4 heads, 2 KV heads, explicit head_dim 12
                   (q_proj is (48, 32)), sliding_window 4 (shorter than the input, so the
                   window matters), untied lm_head. LoRA r=4 alpha=8, all-linear.
    qwen2          Qwen2ForCausalLM, hidden 32, 4 heads, 2 KV heads: bias on q/k/v, not o;
                   tie_word_embeddings=True (no lm_head.weight in the checkpoint);
                   use_sliding_window=False with a sliding_window given, as Qwen2.5's
                   configs have it. LoRA r=4 alpha=8 use_rslora on q/k/v/o_proj + up_proj,
                   rank_pattern {"v_proj": 2}, alpha_pattern {"o_proj": 4}.
    qwen3          Qwen3ForCausalLM, hidden 32, 4 heads, 2 KV heads, explicit head_dim 16
                   (q_proj (64, 32)), q_norm / k_norm, untied; use_sliding_window=True,
                   sliding_window 4, max_window_layers 1, so layer_types is
                   [full_attention, sliding_attention]. LoRA r=4 alpha=16, all-linear.
    llama3_rope    LlamaForCausalLM, hidden 32, 4 heads, 2 KV heads (head_dim 8),
                   rope_parameters llama3 (factor 8, low_freq_factor 1, high_freq_factor 4,
                   original_max_position_embeddings 64, max_position_embeddings 128): with
                   rope_theta 10000 and head_dim 8 the four frequencies fall in all three
                   llama3 regimes (kept, smoothed, divided). LoRA r=4 alpha=8 on q/k/v_proj,
                   down_proj.
    linear_rope    LlamaForCausalLM, hidden 32, 4 heads, 4 KV heads, tie_word_embeddings,
                   linear RoPE scaling factor 2, rope_theta 500000. Its config.json is
                   rewritten the way transformers 4.x wrote it (top-level rope_theta,
                   "rope_scaling": {"type": "linear", "factor": 2.0}, no rope_parameters);
                   transformers 5 is checked to load it to the same model. LoRA r=4
                   alpha=8 on gate/up/down_proj and lm_head.
    yarn_rope      Qwen3ForCausalLM, hidden 32, 4 heads, 2 KV heads, head_dim 16,
                   rope_parameters yarn (factor 4, original_max_position_embeddings 64,
                   max_position_embeddings 256, rope_theta 10000): the eight frequencies
                   are kept, ramped and divided, and the cos/sin tables carry YaRN's
                   attention factor (0.1 ln 4 + 1). LoRA r=4 alpha=8 on q/k/v/o_proj.
    granite        GraniteForCausalLM, hidden 32, 4 heads, 2 KV heads, tie_word_embeddings,
                   embedding_multiplier 3, attention_multiplier 0.25 (not 1/sqrt(8)),
                   residual_multiplier 0.5, logits_scaling 4. LoRA r=4 alpha=8 on every
                   linear layer and lm_head (tied: PEFT adapts the shared table as the head,
                   so the logit scaling applies to an adapted head).
    smollm3        SmolLM3ForCausalLM, hidden 32, 4 heads, 2 KV heads, no_rope_layers [1, 0]
                   (the second layer is NoPE), use_sliding_window with sliding_window 4 and
                   no layer_types (transformers makes the NoPE layer the sliding one),
                   attention_bias (q/k/v/o), tie_word_embeddings left to its default (true).
                   LoRA r=4 alpha=8, all-linear.
    phi3           Phi3ForCausalLM, hidden 32, 4 heads, 2 KV heads: fused qkv_proj (64, 32)
                   and gate_up_proj (128, 32), sliding_window 4 (every layer), untied.
                   LoRA r=4 alpha=8 on qkv_proj, o_proj, gate_up_proj, down_proj.
    phi3_longrope  Phi3ForCausalLM as phi3 but no window, rope_scaling {"type": "su"} (read
                   as longrope) with short_factor [1, 1.25, 1.5, 2] and long_factor
                   [1, 2, 4, 8], original_max_position_embeddings 16 (top level, as Phi-3
                   writes it), max_position_embeddings 64: inputs of 9 positions take the
                   short factors. Its logits.safetensors also holds long_input_ids (1, 24),
                   long_logits and long_lora_logits (past position 16: the long factors),
                   and greedy_ids: the LoRA model's transformers generate() from the first
                   row (9 tokens) for 12 new tokens with the KV cache, crossing position 16.
    phi4_partial   Phi3ForCausalLM shaped as Phi-4-mini: partial_rotary_factor 0.75 (RoPE on
                   the first 6 of each head's 8 dimensions), longrope with 3 short and 3 long
                   factors, original_max_position_embeddings 16, tied embeddings; the same
                   long_* tensors and greedy_ids as phi3_longrope. LoRA r=4 alpha=8,
                   all-linear.
    gemma          GemmaForCausalLM, hidden 32, 4 heads, 2 KV heads, head_dim 16, hidden_act
                   "gelu" (Gemma's legacy name, read as the tanh approximation), tied
                   embeddings; norms stored as the offset from 1, drawn as 0.1 * normal.
                   LoRA r=4 alpha=8, all-linear.
    gemma2         Gemma2ForCausalLM, hidden 32, 4 heads, 2 KV heads, head_dim 16,
                   query_pre_attn_scalar 12, sliding_window 4 on the first layer (Gemma 2's
                   default alternation, no layer_types given), attn_logit_softcapping 2 and
                   final_logit_softcapping 3 (small, so that both change the logits), tied.
                   LoRA r=4 alpha=8, all-linear.
    gemma3         Gemma3ForCausalLM (model_type gemma3_text), hidden 32, 4 heads, 2 KV heads,
                   head_dim 16, query_pre_attn_scalar 12, layer_types [sliding (window 4),
                   full], rope_parameters nested by layer type (full: linear factor 2 at
                   theta 1e6; sliding: default at 1e4), tied embeddings; its norms (stored as
                   the offset from 1) drawn as 0.1 * normal. LoRA r=4 alpha=8 on every linear
                   layer and embed_tokens (PEFT scales the embedding's LoRA output by
                   Gemma's embed_scale too).
    gemma3_mm      Gemma3ForConditionalGeneration (model_type gemma3: image and text), its
                   text_config the gemma3 case's text decoder, a one-layer SigLIP vision
                   tower (hidden 16) and projector; saved as transformers saves it
                   (language_model.model.*, vision_tower.*). LoRA r=4 alpha=8, all-linear:
                   the text decoder's linear layers and the vision tower's. The logits are
                   text-only path's (input_ids, no pixel_values: the image token, 63,
                   is embedded as any other id). Beside it, gemma3_mm/cls: the same model as
                   Gemma3ForSequenceClassification (3 labels, a random `score`, pad id 0),
                   cls_lora: a PEFT SEQ_CLS LoRA on q_proj / v_proj (both towers) with
                   `score` in modules_to_save, cls_logits.safetensors: their logits on a
                   batch with a left-padded row (write_gemma3_classifier).
    olmo2          Olmo2ForCausalLM, hidden 32, 4 heads, 2 KV heads: no norm before attention
                   or the MLP, post_attention_layernorm / post_feedforward_layernorm on
                   their outputs, q_norm / k_norm over the whole projections (32 and 16
                   values), attention_bias on q/k/v/o, untied. LoRA r=4 alpha=8, all-linear.
    olmo3          Olmo3ForCausalLM: olmo2's layers with layer_types [sliding (window 4), full],
                   rope_parameters nested by layer type (full: YaRN factor 2 over 32
                   positions at theta 5e5; sliding: default at 1e4), no biases, untied. LoRA
                   r=4 alpha=8, all-linear.
    mixtral        MixtralForCausalLM, hidden 32, 4 heads, 2 KV heads, 4 experts 32 wide,
                   top 2 (renormalized), sliding_window 4, untied. LoRA r=4 alpha=8 on
                   q/k/v/o_proj.
    qwen2_moe      Qwen2MoeForCausalLM: layer 0 dense (decoder_sparse_step 2), layer 1
                   sparse: 4 experts 16 wide, top 2, norm_topk_prob, a shared expert 48
                   wide and its sigmoid gate; q/k/v bias. LoRA r=4 alpha=8, all-linear.
    qwen3_moe      Qwen3MoeForCausalLM: layer 0 sparse (4 experts 16 wide, top 2, not
                   renormalized), layer 1 dense (mlp_only_layers [1]); head_dim 16, q/k
                   norms, use_sliding_window with window 4 (every layer). LoRA r=4
                   alpha=8 on q/k/v/o_proj.
    olmoe          OlmoeForCausalLM: pre-norm layers, q/k norms over the whole projections,
                   clip_qkv 1, attention_bias, 4 experts 32 wide in every layer (top 2, not
                   renormalized). LoRA r=4 alpha=8 on q/k/v/o_proj; olmoe/experts as
                   mixtral's.
    gpt_oss        GptOssForCausalLM: attention sinks, biased q/k/v/o, layer_types
                   [sliding (window 4), full], YaRN x2 over 32 positions (truncate false),
                   4 experts 16 wide (top 2, softmax of the chosen logits, biased router),
                   stacked (E, in, out) with biases, clamped SwiGLU with swiglu_limit 1.
                   LoRA r=4 alpha=8 all-linear (the attention); gpt_oss/experts: LoRA on
                   q/v_proj and target_parameters experts.gate_up_proj,
                   experts.down_proj, router.weight.
    gpt_oss_mxfp4  (write_gpt_oss_mxfp4) a gpt_oss base, experts 32 wide, stored as the
                   released checkpoints are: MXFP4 experts, bf16 elsewhere; the logits
                   transformers gives for it in f32.

Besides the cases, yarn_params.json holds transformers' own YaRN frequencies
(`ROPE_INIT_FUNCTIONS["yarn"]`: inv_freq as f32 values, attention_factor) for configs
that reach every branch of its parameter resolution (truncate off, beta_fast/beta_slow,
a null factor, mscale / mscale_all_dim, an explicit attention_factor, a top-level
original_max_position_embeddings, a Qwen3-sized head).

Base models: every parameter redrawn (matrices and embeddings 0.2 * normal, biases
0.1 * normal, RMSNorm weights incl. q_norm / k_norm 1 + 0.1 * normal). Adapters:
get_peft_model on the saved base, every trainable parameter gets 0.2 * normal added
(lora_B starts at zero), saved, then reloaded with PeftModel.from_pretrained onto a
fresh base for the expected logits.

For each CASE tests/fixtures/models/llama/ holds:
    CASE/base/               save_pretrained: model.safetensors, config.json,
                             generation_config.json
    CASE/lora/               PEFT save_pretrained (adapter_config.json,
                             adapter_model.safetensors; PEFT's README.md removed)
    CASE/logits.safetensors  input_ids (i64, (2, 9)), logits (the base, (2, 9, 64) f32)
                             and lora_logits (the reloaded, unmerged PeftModel, eval),
                             attention_mask all ones, default attention implementation;
                             KIND_logits for the second adapter (below)
    CASE/KIND/               the second adapter (SECOND): mistral/vera (VeRA r=8 on
                             q_proj, v_proj, down_proj), qwen2/dora (DoRA r=4 alpha=8 on
                             q/v/gate/down_proj), qwen3/adalora (AdaLoRA init_r=4 alpha=8
                             on q/k/o/up_proj, untrained: no rank_pattern), llama3_rope/dora
                             (DoRA r=4 alpha=8 on q/o/gate_proj), phi3/dora (DoRA r=4
                             alpha=8 on the fused qkv_proj, gate_up_proj), mixtral/experts and
                             qwen3_moe/experts (LoRA r=4 alpha=8 all-linear, which PEFT 0.21
                             turns into target_parameters on the experts and the router too;
                             qwen3_moe's with rsLoRA); made like the LoRA with
                             seed + 2 after it, every trainable tensor + 0.2 * normal
    qwen2/logits.safetensors also multi_default_logits, multi_dora_logits,
                             multi_disabled_logits, multi_after_delete_logits: one
                             PeftModel with the LoRA ("default") and the DoRA
                             (load_adapter as "dora"), set_adapter / disable_adapter /
                             merge_adapter + set_adapter("dora") (PEFT unmerges first) /
                             delete_adapter("default")

Sanity checks the script makes: each adapter changes the logits (and the second
adapter's differ from the LoRA's); the sliding window
(mistral, qwen3) and the RoPE scaling (llama3_rope, linear_rope) each change the base
logits (the same weights with the option off differ by > 1e-3); eager and sdpa
attention agree; the rewritten legacy config loads to the same logits.

Versions used to generate the committed files: torch 2.15.0, transformers 5.24.0,
peft 0.21.2, safetensors 0.8.0 (Python 3.11); granite, smollm3, phi3, phi3_longrope,
phi4_partial, gemma, gemma2, gemma3, gemma3_mm, olmo2, olmo3, mixtral, qwen2_moe, qwen3_moe, olmoe, yarn_rope and yarn_params.json were added later with transformers 5.25.0, whose logits for the other cases differ from the
committed 5.24 ones by at most 5e-6 (the committed files were kept). PYTHONHASHSEED is pinned (PEFT stores
target_modules from a set); HF_HUB_OFFLINE=1.
"""

import copy
import json
import os
import shutil
import warnings

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Phi3Config,
    Phi3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model
from fixture_env import rerun_pinned

ROOT = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models", "llama")
)

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
)

# The gemma3 case's text decoder, also gemma3_mm's text_config.
GEMMA3_TEXT = dict(
    **COMMON,
    head_dim=16,
    query_pre_attn_scalar=12,
    max_position_embeddings=64,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
    rope_parameters=dict(
        full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1_000_000.0),
        sliding_attention=dict(rope_type="default", rope_theta=10_000.0),
    ),
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)

# name: (model class, config class, config kwargs, LoraConfig kwargs, seed,
#        config kwargs that switch the tested option off (for the sanity check))
CASES = {
    "mistral": (
        MistralForCausalLM,
        MistralConfig,
        dict(**COMMON, head_dim=12, sliding_window=4, max_position_embeddings=64, tie_word_embeddings=False),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        6000,
        dict(sliding_window=None),
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(
            **COMMON,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=4,
            max_window_layers=1,
        ),
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"o_proj": 4},
        ),
        7000,
        None,
    ),
    "qwen3": (
        Qwen3ForCausalLM,
        Qwen3Config,
        dict(
            **COMMON,
            head_dim=16,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
        dict(r=4, lora_alpha=16, target_modules="all-linear"),
        8000,
        dict(use_sliding_window=False),
    ),
    "llama3_rope": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            **COMMON,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
        9000,
        dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    ),
    "linear_rope": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            **{**COMMON, "num_key_value_heads": 4},
            max_position_embeddings=64,
            tie_word_embeddings=True,
            rope_parameters=dict(rope_type="linear", rope_theta=500000.0, factor=2.0),
        ),
        dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj", "lm_head"]),
        10000,
        dict(rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
    ),
    "granite": (
        GraniteForCausalLM,
        GraniteConfig,
        dict(
            **COMMON,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            embedding_multiplier=3.0,
            attention_multiplier=0.25,
            residual_multiplier=0.5,
            logits_scaling=4.0,
        ),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
        ),
        12000,
        dict(embedding_multiplier=1.0, attention_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0),
    ),
    "smollm3": (
        SmolLM3ForCausalLM,
        SmolLM3Config,
        dict(
            **COMMON,
            max_position_embeddings=64,
            no_rope_layers=[1, 0],
            use_sliding_window=True,
            sliding_window=4,
            attention_bias=True,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        13000,
        dict(no_rope_layers=[1, 1], use_sliding_window=False),
    ),
    "phi3": (
        Phi3ForCausalLM,
        Phi3Config,
        dict(
            **COMMON,
            max_position_embeddings=64,
            sliding_window=4,
            tie_word_embeddings=False,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
        14000,
        dict(sliding_window=None),
    ),
    "phi3_longrope": (
        Phi3ForCausalLM,
        Phi3Config,
        dict(
            **COMMON,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            tie_word_embeddings=False,
            rope_scaling=dict(type="su", short_factor=[1.0, 1.25, 1.5, 2.0], long_factor=[1.0, 2.0, 4.0, 8.0]),
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
        15000,
        dict(rope_scaling=None),
    ),
    "phi4_partial": (
        Phi3ForCausalLM,
        Phi3Config,
        dict(
            **COMMON,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            tie_word_embeddings=True,
            partial_rotary_factor=0.75,
            rope_scaling=dict(type="longrope", short_factor=[1.0, 1.5, 2.0], long_factor=[1.0, 3.0, 6.0]),
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        16000,
        dict(partial_rotary_factor=1.0, rope_scaling=None),
    ),
    "gemma": (
        GemmaForCausalLM,
        GemmaConfig,
        dict(
            **COMMON,
            head_dim=16,
            hidden_act="gelu",
            max_position_embeddings=64,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        18000,
        None,
    ),
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config,
        dict(
            **COMMON,
            head_dim=16,
            query_pre_attn_scalar=12,
            max_position_embeddings=64,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        19000,
        dict(attn_logit_softcapping=None, final_logit_softcapping=None),
    ),
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GEMMA3_TEXT,
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]),
        17000,
        dict(query_pre_attn_scalar=16, rope_parameters=None),
    ),
    "gemma3_mm": (
        Gemma3ForConditionalGeneration,
        Gemma3Config,
        dict(
            text_config=GEMMA3_TEXT,
            vision_config=dict(
                hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, image_size=28, patch_size=14,
            ),
            mm_tokens_per_image=4,
            image_token_index=63,
            boi_token_index=61,
            eoi_token_index=62,
        ),
        # all-linear reaches the vision tower too (fc1, fc2, out_proj, ...).
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        17500,
        None,
    ),
    "olmo2": (
        Olmo2ForCausalLM,
        Olmo2Config,
        dict(
            **COMMON,
            attention_bias=True,
            tie_word_embeddings=False,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        21000,
        None,
    ),
    "olmo3": (
        Olmo3ForCausalLM,
        Olmo3Config,
        dict(
            **COMMON,
            max_position_embeddings=64,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=dict(
                full_attention=dict(
                    rope_type="yarn", factor=2.0, original_max_position_embeddings=32,
                    rope_theta=500_000.0,
                ),
                sliding_attention=dict(rope_type="default", rope_theta=10_000.0),
            ),
            tie_word_embeddings=False,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        22000,
        dict(sliding_window=64),
    ),
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(
            **{**COMMON, "intermediate_size": 32},
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
        # The attention (all-linear would add PEFT's target_parameters on the experts and
        # the router: the `experts` second adapter).
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        23000,
        dict(sliding_window=None),
    ),
    "qwen2_moe": (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig,
        dict(
            **COMMON,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
        # all-linear: attention, layer 0's dense MLP, layer 1's shared expert and its gate.
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        24000,
        dict(norm_topk_prob=False),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(
            **COMMON,
            head_dim=16,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            use_sliding_window=True,
            sliding_window=4,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        ),
        # The attention: PEFT 0.21 turns `gate_proj` / `up_proj` / `down_proj` (and
        # all-linear) into target_parameters on the experts for qwen3_moe, leaving the dense
        # layer's MLP unadapted.
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        25000,
        dict(norm_topk_prob=True),
    ),
    "olmoe": (
        OlmoeForCausalLM,
        OlmoeConfig,
        dict(
            **{**COMMON, "intermediate_size": 32},
            num_experts=4,
            num_experts_per_tok=2,
            clip_qkv=1.0,
            attention_bias=True,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        26000,
        dict(clip_qkv=None),
    ),
    "gpt_oss": (
        GptOssForCausalLM,
        GptOssConfig,
        dict(
            **{**COMMON, "intermediate_size": 16},
            head_dim=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            max_position_embeddings=64,
            rope_parameters=dict(
                rope_type="yarn", factor=2.0, original_max_position_embeddings=32,
                beta_fast=32.0, beta_slow=1.0, truncate=False, rope_theta=150_000.0,
            ),
            swiglu_limit=1.0,
            tie_word_embeddings=False,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        ),
        # all-linear: the attention only (the router and the experts are parameters).
        dict(r=4, lora_alpha=8, target_modules="all-linear"),
        27000,
        dict(swiglu_limit=100.0),
    ),
    "yarn_rope": (
        Qwen3ForCausalLM,
        Qwen3Config,
        dict(
            **COMMON,
            head_dim=16,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=10000.0,
                factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        11000,
        dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    ),
}

# YaRN parameter sets for yarn_params.json: (name, model_type, config.json keys). Each is
# a whole config.json lorakit reads (LlamaConfig::from_json) beside transformers' output.
YARN_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=2)
YARN_PARAMS = [
    ("fixture", "qwen3", dict(**YARN_TINY, head_dim=16, max_position_embeddings=256,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                             original_max_position_embeddings=64))),
    ("no_truncate_betas", "llama", dict(**YARN_TINY, head_dim=32, max_position_embeddings=512,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, truncate=False,
                             beta_fast=16.0, beta_slow=2.0, original_max_position_embeddings=64))),
    ("null_factor_mscale", "qwen2", dict(**YARN_TINY, max_position_embeddings=1024,
        rope_scaling=dict(type="yarn", factor=None, mscale=1.0, mscale_all_dim=0.8,
                          original_max_position_embeddings=128), rope_theta=50000.0)),
    ("attention_factor_top_level_original", "mistral", dict(**YARN_TINY, head_dim=24,
        max_position_embeddings=4096, original_max_position_embeddings=32,
        rope_parameters=dict(rope_type="yarn", rope_theta=1000000.0, factor=2.0,
                             attention_factor=1.5, original_max_position_embeddings=999))),
    ("qwen3_card", "qwen3", dict(**YARN_TINY, head_dim=128, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
        rope_theta=1000000.0)),
    # openai/gpt-oss-20b's RoPE keys as published (transformers 4.55's rope_scaling).
    ("gpt_oss_20b", "gpt_oss", dict(**YARN_TINY, head_dim=64, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                          truncate=False, original_max_position_embeddings=4096),
        rope_theta=150000)),
]
CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
                  "gpt_oss": GptOssConfig}
INPUT_SHAPE = (2, 9)

# The second adapter of a case (another variant, on the same base): name -> (folder,
# PEFT config). Made after the LoRA with its own seed (case seed + 2), so the LoRA files
# do not depend on it. Targets differ from the LoRA's on purpose (some shared, some not):
# qwen2's pair is also the multi-adapter reference (load_adapter + set_adapter).
SECOND = {
    "mistral": (
        "vera",
        lambda: VeraConfig(
            task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj", "down_proj"],
            projection_prng_key=0, save_projection=True,
        ),
    ),
    "qwen2": (
        "dora",
        lambda: LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
        ),
    ),
    "qwen3": (
        "adalora",
        lambda: AdaLoraConfig(
            task_type="CAUSAL_LM", init_r=4, target_r=2, lora_alpha=8, total_step=10,
            target_modules=["q_proj", "k_proj", "o_proj", "up_proj"],
        ),
    ),
    "phi3": (
        "dora",
        lambda: LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
            target_modules=["qkv_proj", "gate_up_proj"],
        ),
    ),
    # all-linear on a mixture of experts: PEFT 0.21 adds target_parameters on the experts
    # (gate_up_proj at rank 2r and alpha 2·alpha, down_proj) and the router (gate.weight).
    "mixtral": (
        "experts",
        lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
    ),
    "olmoe": (
        "experts",
        lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"),
    ),
    "qwen3_moe": (
        "experts",
        lambda: LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear",
        ),
    ),
    # LoRA on GPT-OSS's experts and router, named in target_parameters (as PEFT's
    # documentation does for GPT-OSS), beside q/v_proj.
    "gpt_oss": (
        "experts",
        lambda: LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj", "router.weight"],
        ),
    ),
    "llama3_rope": (
        "dora",
        lambda: LoraConfig(
            task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
            target_modules=["q_proj", "o_proj", "gate_proj"],
        ),
    ),
}


def log(msg):
    print(msg, flush=True)


def case_dir(case, *parts):
    return os.path.join(ROOT, case, *parts)


def name_of(case):
    return f"lorakit-fixtures/model-{case}"


def is_norm(name):
    parts = name.rsplit(".", 2)
    return len(parts) >= 2 and "norm" in parts[-2]


def build_base(case, overrides=None):
    model_cls, config_cls, kwargs, _, seed, _ = CASES[case]
    kwargs = copy.deepcopy(kwargs)
    if overrides:
        kwargs.update(copy.deepcopy(overrides))
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif is_norm(name):
                # Gemma's norms store the weight's offset from 1.
                one = 0.0 if model.config.model_type.startswith("gemma") else 1.0
                p.copy_(one + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.name_or_path = name_of(case)
    model.config._name_or_path = name_of(case)
    return model.eval()


def load_base(case, attn=None):
    model_cls = CASES[case][0]
    extra = {"attn_implementation": attn} if attn else {}
    model = model_cls.from_pretrained(case_dir(case, "base"), dtype=torch.float32, **extra)
    assert model.dtype == torch.float32
    model.name_or_path = name_of(case)
    model.config._name_or_path = name_of(case)
    return model.eval()


def input_ids_for(case):
    g = torch.Generator().manual_seed(CASES[case][4] + 7)
    return torch.randint(0, COMMON["vocab_size"], INPUT_SHAPE, generator=g, dtype=torch.int64)


def logits_of(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return out.detach().float().contiguous().clone()


def rewrite_legacy_config(case):
    """config.json as transformers 4.x wrote it: rope_theta at the top, rope_scaling."""
    path = case_dir(case, "base", "config.json")
    with open(path) as f:
        config = json.load(f)
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    config["rope_scaling"] = {"type": rope_type, **rope}
    config["transformers_version"] = "4.46.0"
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def write_case(case):
    model_cls, _, _, lora_kwargs, seed, off = CASES[case]
    os.makedirs(case_dir(case))
    ids = input_ids_for(case)
    base = build_base(case)
    base.save_pretrained(case_dir(case, "base"), safe_serialization=True)
    sd = load_file(case_dir(case, "base", "model.safetensors"))
    tied = base.config.tie_word_embeddings
    assert ("lm_head.weight" in sd) == (not tied), f"{case}: lm_head.weight in checkpoint: {'lm_head.weight' in sd}"
    expected = logits_of(base, ids)
    if case == "linear_rope":
        rewrite_legacy_config(case)
    log(f"== {case}: {len(sd)} tensors, config {base.config.to_diff_dict().get('layer_types', '')}")

    # The saved folder reloads to the same model (legacy config included), and eager and
    # sdpa attention agree.
    reloaded = logits_of(load_base(case), ids)
    assert torch.equal(reloaded, expected) or (reloaded - expected).abs().max() < 1e-6, case
    eager = logits_of(load_base(case, "eager"), ids)
    diff = (eager - expected).abs().max().item()
    log(f"  eager vs sdpa: {diff:.1e}")
    assert diff < 1e-5, case
    if off is not None:
        other = logits_of(build_base(case, off), ids)
        d = (other - expected).abs().max().item()
        log(f"  with {off}: logits change by {d:.3f}")
        assert d > 1e-3, f"{case}: the option does not change the logits"

    # Adapter.
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_peft_model(load_base(case), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        pm.eval()
        pm.save_pretrained(case_dir(case, "lora"))
    for w in caught:
        log(f"  warning (get_peft_model/save): {w.category.__name__}: {w.message}")
    readme = case_dir(case, "lora", "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    adapter = load_file(case_dir(case, "lora", "adapter_model.safetensors"))
    log(f"  adapter: {len(adapter)} tensors, modules {sorted({k.split('.lora_')[0].rsplit('.', 1)[-1] for k in adapter})}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(load_base(case), case_dir(case, "lora")).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    lora_logits = logits_of(peft_model, ids)
    in_memory = logits_of(pm, ids)
    assert (in_memory - lora_logits).abs().max() < 1e-5, case
    change = (lora_logits - expected).abs().max().item()
    log(f"  adapter changes the logits by {change:.3f}")
    assert change > 1e-2, case

    tensors = {"input_ids": ids.contiguous(), "logits": expected, "lora_logits": lora_logits}
    if case in ("phi3_longrope", "phi4_partial"):
        tensors.update(longrope_extras(case, peft_model))
    if case in SECOND:
        tensors.update(write_second(case, ids, expected, lora_logits))
    save_file(tensors, case_dir(case, "logits.safetensors"), metadata={"format": "pt"})


def longrope_extras(case, peft_model):
    """Logits past original_max_position_embeddings (the long factors) and a greedy
    generation with the KV cache that crosses it."""
    g = torch.Generator().manual_seed(CASES[case][4] + 9)
    long_ids = torch.randint(0, COMMON["vocab_size"], (1, 24), generator=g, dtype=torch.int64)
    base = load_base(case)
    short = logits_of(base, long_ids[:, :9])
    assert (short - logits_of(base, input_ids_for(case)[:1]) ).abs().max() > 0  # other ids
    out = {
        "long_input_ids": long_ids.contiguous(),
        "long_logits": logits_of(base, long_ids),
        "long_lora_logits": logits_of(peft_model, long_ids),
    }
    # The long factors change the first positions' logits too (a different inv_freq).
    assert (out["long_logits"][:, :9] - short).abs().max() > 1e-3, "long factors unused"
    prompt = input_ids_for(case)[:1]
    with torch.no_grad():
        gen = peft_model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
            min_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    out["greedy_ids"] = gen[:, prompt.shape[1]:].contiguous()
    log(f"  longrope: long logits and greedy ids {out['greedy_ids'].tolist()}")
    return out


def write_second(case, ids, expected, lora_logits):
    """The case's second adapter (SECOND): saved to CASE/<kind>/, reloaded alone for
    `<kind>_logits`; for qwen2 also the multi-adapter reference: one PeftModel with the
    LoRA (as "default") and this adapter (load_adapter as "<kind>"), switched with
    set_adapter and disable_adapter."""
    kind, make_config = SECOND[case]
    seed = CASES[case][4]
    torch.manual_seed(seed + 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = get_peft_model(load_base(case), make_config())
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        pm.eval()
        pm.save_pretrained(case_dir(case, kind))
    for w in caught:
        log(f"  warning ({kind} get_peft_model/save): {w.category.__name__}: {w.message}")
    readme = case_dir(case, kind, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone = PeftModel.from_pretrained(load_base(case), case_dir(case, kind)).eval()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    logits = logits_of(alone, ids)
    assert (logits_of(pm, ids) - logits).abs().max() < 1e-5, (case, kind)
    change = (logits - expected).abs().max().item()
    log(f"  {kind} adapter changes the logits by {change:.3f}")
    assert change > 1e-2, (case, kind)
    assert (logits - lora_logits).abs().max().item() > 1e-2, (case, kind)
    out = {f"{kind}_logits": logits}
    if kind == "experts":
        # PEFT's merge of the LoRA on parameters, saved by transformers under the
        # checkpoint's per-expert names: what `lorakit merge` must write.
        merged = alone.merge_and_unload()
        merged_logits = logits_of(merged, ids)
        assert (merged_logits - logits).abs().max() < 1e-4, (case, "merged")
        tmp = case_dir(case, "experts_merged_tmp")
        merged.save_pretrained(tmp)
        state = load_file(os.path.join(tmp, "model.safetensors"))
        base_names = set(load_file(case_dir(case, "base", "model.safetensors")))
        assert set(state) == base_names, sorted(set(state) ^ base_names)[:4]
        save_file(state, case_dir(case, "experts_merged.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(tmp)
        log(f"  experts merged: {len(state)} tensors under the checkpoint's names")
    if case == "qwen2":
        multi = PeftModel.from_pretrained(load_base(case), case_dir(case, "lora")).eval()
        multi.load_adapter(case_dir(case, kind), adapter_name=kind)
        assert multi.active_adapter == "default"
        out["multi_default_logits"] = logits_of(multi, ids)
        multi.set_adapter(kind)
        out[f"multi_{kind}_logits"] = logits_of(multi, ids)
        with multi.disable_adapter():
            out["multi_disabled_logits"] = logits_of(multi, ids)
        # Merged, then set_adapter: PEFT unmerges first (with a warning).
        multi.set_adapter("default")
        multi.merge_adapter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            multi.set_adapter(kind)
        assert any("Unmerging" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert (logits_of(multi, ids) - out[f"multi_{kind}_logits"]).abs().max() < 1e-5
        multi.delete_adapter("default")
        out["multi_after_delete_logits"] = logits_of(multi, ids)
        for name, want in [("default", lora_logits), (kind, logits), ("disabled", expected)]:
            d = (out[f"multi_{name}_logits"] - want).abs().max().item()
            log(f"  multi {name} vs alone: {d:.1e}")
    return out


README = """# Llama-family model fixtures (generated)

Generated by `scripts/make_model_fixtures.py` (torch 2.15.0, transformers 5.24.0,
peft 0.21.2; `granite`, `smollm3`, `phi3`, `phi3_longrope`, `phi4_partial`, `gemma`,
`gemma2`, `gemma3`, `gemma3_mm`, `olmo2`, `olmo3`, `mixtral`, `qwen2_moe`, `qwen3_moe`, `olmoe`, `gpt_oss`, `gpt_oss_mxfp4`, `yarn_rope` and `yarn_params.json` with transformers 5.25.0; see its docstring). Regenerate with

    python3 scripts/make_model_fixtures.py

which removes and rewrites this folder (deterministic). Used by
`tests/suite/models_llama.rs` to check `lorakit::models::llama` against transformers
and PEFT.

| case | model | what it exercises | LoRA |
| --- | --- | --- | --- |
| `mistral` | MistralForCausalLM | explicit `head_dim` 12 (≠ hidden/heads), GQA 4/2, `sliding_window` 4 < input length | r=4 α=8 all-linear |
| `qwen2` | Qwen2ForCausalLM | q/k/v bias (o without), tied embeddings (no `lm_head.weight`), `use_sliding_window: false` | r=4 α=8 rsLoRA, q/k/v/o/up_proj, rank_pattern v_proj=2, alpha_pattern o_proj=4 |
| `qwen3` | Qwen3ForCausalLM | `head_dim` 16, q_norm / k_norm, `layer_types` [full, sliding] (window 4) | r=4 α=16 all-linear |
| `llama3_rope` | LlamaForCausalLM | `rope_type: llama3` (factor 8, original max 64), every frequency regime | r=4 α=8 q/k/v/down_proj |
| `linear_rope` | LlamaForCausalLM | linear RoPE scaling (factor 2, theta 5e5), tied embeddings, config.json in transformers 4.x form (`rope_theta` + `rope_scaling`) | r=4 α=8 gate/up/down_proj + lm_head (tied: PEFT adapts the shared table as the head) |
| `granite` | GraniteForCausalLM | Granite's `embedding_multiplier` 3, `attention_multiplier` 0.25, `residual_multiplier` 0.5, `logits_scaling` 4; tied embeddings | r=4 α=8 every linear layer + lm_head (tied) |
| `smollm3` | SmolLM3ForCausalLM | `no_rope_layers` [1, 0] (a NoPE layer), the sliding window on it by transformers' default `layer_types`, `attention_bias`, tied embeddings by default | r=4 α=8 all-linear |
| `phi3` | Phi3ForCausalLM | fused `qkv_proj` and `gate_up_proj`, `sliding_window` 4 on every layer | r=4 α=8 qkv_proj, o_proj, gate_up_proj, down_proj |
| `phi3_longrope` | Phi3ForCausalLM | `rope_scaling` `su` (longrope) with short and long factors, `original_max_position_embeddings` 16: `long_input_ids` / `long_logits` / `long_lora_logits` (24 positions, the long factors) and `greedy_ids` (12 new tokens with the cache, crossing position 16) in its `logits.safetensors` | r=4 α=8 qkv_proj, o_proj, gate_up_proj, down_proj |
| `phi4_partial` | Phi3ForCausalLM | Phi-4-mini's shape: `partial_rotary_factor` 0.75 (RoPE on 6 of each head's 8 dimensions) with longrope (3 short and 3 long factors, original 16), tied embeddings; `long_*` and `greedy_ids` as `phi3_longrope` | r=4 α=8 all-linear |
| `gemma` | GemmaForCausalLM | norms times `1 + weight`, GELU-tanh gate (`hidden_act` `gelu`, Gemma's legacy name), embeddings times √hidden, `head_dim` 16, tied | r=4 α=8 all-linear |
| `gemma2` | Gemma2ForCausalLM | as `gemma` plus a norm after each branch, `query_pre_attn_scalar` 12, the first layer sliding (window 4) by Gemma 2's default, `attn_logit_softcapping` 2 and `final_logit_softcapping` 3 | r=4 α=8 all-linear |
| `gemma3` | Gemma3ForCausalLM | `gemma3_text`: norms times `1 + weight` (also after attention and around the MLP), q/k norms, GELU-tanh gate, embeddings times √hidden, `query_pre_attn_scalar` 12, `layer_types` [sliding (window 4), full] with RoPE per layer type (full: linear ×2 at θ 1e6, sliding: θ 1e4), `head_dim` 16, tied | r=4 α=8 every linear layer + `embed_tokens` |
| `gemma3_mm` | Gemma3ForConditionalGeneration | `gemma3` (image and text): `gemma3`'s text decoder as its `text_config`, a one-layer SigLIP vision tower and projector; tensors stored as `language_model.model.…`, `vision_tower.…`; logits of the text-only path | r=4 α=8 all-linear: the text decoder's and the vision tower's linear layers |
| `olmo2` | Olmo2ForCausalLM | norms after attention and the MLP only, q/k norms over the whole projections, `attention_bias`, untied | r=4 α=8 all-linear |
| `olmo3` | Olmo3ForCausalLM | OLMo 2's layers; `layer_types` [sliding (window 4), full], RoPE per layer type (full: YaRN ×2 over 32 positions at θ 5e5; sliding: θ 1e4), untied | r=4 α=8 all-linear |
| `mixtral` | MixtralForCausalLM | a sparse mixture of 4 experts (top 2, renormalized) in every layer, stored as `block_sparse_moe.experts.E.w1/w2/w3` and `block_sparse_moe.gate`; `sliding_window` 4 | r=4 α=8 q/k/v/o_proj |
| `qwen2_moe` | Qwen2MoeForCausalLM | layer 0 dense (`decoder_sparse_step` 2), layer 1 4 experts (top 2, `norm_topk_prob`) beside a shared expert (48 wide) gated by `sigmoid(shared_expert_gate)`; q/k/v bias | r=4 α=8 all-linear (attention, the dense MLP, the shared expert and its gate) |
| `qwen3_moe` | Qwen3MoeForCausalLM | layer 0 4 experts (top 2, not renormalized), layer 1 dense (`mlp_only_layers` [1]); q/k norms, `head_dim` 16, the window (4) on every layer | r=4 α=8 q/k/v/o_proj |
| `olmoe` | OlmoeForCausalLM | pre-norm layers with q/k norms over the whole projections, `clip_qkv` 1 (queries, keys and values clamped), `attention_bias`, 4 experts 32 wide in every layer (top 2, not renormalized) | r=4 α=8 q/k/v/o_proj |
| `gpt_oss` | GptOssForCausalLM | biased attention with a sink logit per head, `layer_types` [sliding (window 4), full], YaRN ×2 over 32 positions (θ 1.5e5, `truncate` false), `head_dim` 8; 4 experts 16 wide in every layer (top 2, the softmax of the chosen logits, biased router), stored stacked `(E, in, out)` with biases, gate and up interleaved through the clamped SwiGLU (`swiglu_limit` 1, so the clamps bite) | r=4 α=8 all-linear (q/k/v/o_proj: the experts and router are parameters) |
| `yarn_rope` | Qwen3ForCausalLM | `rope_type: yarn` (factor 4, original max 64, head_dim 16): kept, ramped and divided frequencies, the attention factor on cos/sin | r=4 α=8 q/k/v/o_proj |

Vocab 64, hidden 32, intermediate 64, 2 layers, 4 heads (2 KV heads but `linear_rope`),
f32, random weights (matrices 0.2·N, biases 0.1·N, norms 1 + 0.1·N; Gemma's stored norm
offsets 0.1·N).

| path | what |
| --- | --- |
| `CASE/base/` | `save_pretrained`: `model.safetensors`, `config.json`, `generation_config.json` |
| `CASE/lora/` | PEFT `save_pretrained`: `adapter_config.json`, `adapter_model.safetensors` |
| `CASE/logits.safetensors` | `input_ids` (i64 (2, 9)), `logits` (base, f32 (2, 9, 64)), `lora_logits` (unmerged PeftModel reloaded from `lora/`, eval), `KIND_logits` (the second adapter, likewise) |
| `CASE/KIND/` | a second adapter of another variant (below), PEFT `save_pretrained` |
| `yarn_params.json` | transformers' YaRN `inv_freq` (f32 values) and `attention_factor` for six configs (each a whole `config.json`, in `config`) covering its parameter resolution, and gpt-oss-20b's |

Second adapters (made after the LoRA with seed + 2; targets overlap the LoRA's in part):

| case | `KIND` | PEFT config |
| --- | --- | --- |
| `mistral` | `vera` | VeRA r=8 on q_proj, v_proj, down_proj (shapes differ: the shared pair is sliced), projections saved |
| `qwen2` | `dora` | DoRA r=4 α=8 on q_proj, v_proj, gate_proj, down_proj |
| `qwen3` | `adalora` | AdaLoRA init_r=4 (target_r 2, not trained: no rank_pattern) α=8 on q/k/o_proj, up_proj |
| `llama3_rope` | `dora` | DoRA r=4 α=8 on q_proj, o_proj, gate_proj |
| `phi3` | `dora` | DoRA r=4 α=8 on the fused qkv_proj and gate_up_proj |
| `mixtral` | `experts` | LoRA r=4 α=8 all-linear: PEFT 0.21 adds `target_parameters` `gate_up_proj` (r=8, α=16), `gate.weight`, `down_proj`: the experts' stacked weights and the router |
| `qwen3_moe` | `experts` | as `mixtral`'s, with rsLoRA |
| `olmoe` | `experts` | as `mixtral`'s |
| `gpt_oss` | `experts` | LoRA r=4 α=8 on q_proj, v_proj and `target_parameters` `experts.gate_up_proj`, `experts.down_proj`, `router.weight` (as PEFT's documentation does for gpt-oss) |

`qwen3_moe/cls`, `cls_lora`, `cls_logits.safetensors`: Qwen3MoeForSequenceClassification
over the `qwen3_moe` base (3 labels, pad id 0), its PEFT SEQ_CLS LoRA (q_proj, v_proj) and
their logits on a batch with a left-padded row, as `gemma3_mm`'s; `mixtral/cls…`,
`qwen2_moe/cls…` and `gpt_oss/cls…` the same with MixtralForSequenceClassification,
Qwen2MoeForSequenceClassification and GptOssForSequenceClassification.

`mixtral/experts_merged.safetensors`, `qwen3_moe/…`, `olmoe/…` and `gpt_oss/…`: the base
with the `experts` adapter merged by PEFT (`merge_and_unload`), saved by transformers under
the checkpoint's names (per expert; gpt-oss's stacks whole).

`gpt_oss_mxfp4/base/`: a `gpt_oss` base with experts 32 wide (MXFP4 groups are 32 values)
stored as the released gpt-oss checkpoints are: the experts' stacks in MXFP4
(`…_blocks`, `…_scales`, packed by `mxfp4_pack`), everything else bf16,
`quantization_config` mxfp4; `gpt_oss_mxfp4/logits.safetensors`: `input_ids` and the
`logits` transformers gives loading it in f32 (it dequantizes the experts on a CPU).

`qwen2/logits.safetensors` also holds the multi-adapter reference: one PeftModel with the
LoRA as `default` and the DoRA added by `load_adapter(dora/, adapter_name="dora")`:
`multi_default_logits` (default active), `multi_dora_logits` (after `set_adapter("dora")`),
`multi_disabled_logits` (inside `disable_adapter()`), `multi_after_delete_logits` (after
`merge_adapter()` on default, `set_adapter("dora")` (PEFT unmerges first, with a warning,
checked) and `delete_adapter("default")`: dora is active).
"""


def write_gemma3_classifier():
    """gemma3_mm/cls: Gemma3ForSequenceClassification over the gemma3_mm base (3 labels,
    `score` drawn as 0.3 * normal, pad id 0 in text_config), its PEFT SEQ_CLS LoRA
    (cls_lora: q_proj, v_proj of every tower, `score` in modules_to_save) and their logits
    on a batch with a left-padded row (cls_logits.safetensors: input_ids, attention_mask,
    logits, lora_logits)."""
    from transformers import Gemma3ForSequenceClassification

    write_classifier("gemma3_mm", Gemma3ForSequenceClassification, lambda c: c.text_config)


def write_moe_classifiers():
    """qwen3_moe/cls: Qwen3MoeForSequenceClassification over the qwen3_moe base (a sparse
    layer, then a dense one), pad id 0, as gemma3_mm/cls; mixtral/cls, qwen2_moe/cls
    (its shared expert) and gpt_oss/cls (its sinks) the same way."""
    from transformers import (
        GptOssForSequenceClassification,
        MixtralForSequenceClassification,
        Qwen2MoeForSequenceClassification,
        Qwen3MoeForSequenceClassification,
    )

    for case, cls_class in [
        ("qwen3_moe", Qwen3MoeForSequenceClassification),
        ("mixtral", MixtralForSequenceClassification),
        ("qwen2_moe", Qwen2MoeForSequenceClassification),
        ("gpt_oss", GptOssForSequenceClassification),
    ]:
        write_classifier(case, cls_class, lambda c: c)


def write_classifier(case, cls_class, pad_config):
    """CASE/cls: `cls_class` over CASE's base (3 labels, `score` drawn as 0.3 * normal, pad
    id 0 set on `pad_config(config)`), its PEFT SEQ_CLS LoRA (cls_lora: q_proj, v_proj,
    `score` in modules_to_save) and their logits on a batch with a left-padded row
    (cls_logits.safetensors: input_ids, attention_mask, logits, lora_logits)."""
    torch.manual_seed(CASES[case][4] + 3)
    model = cls_class.from_pretrained(case_dir(case, "base"), num_labels=3)
    pad_config(model.config).pad_token_id = 0
    with torch.no_grad():
        model.score.weight.copy_(0.3 * torch.randn_like(model.score.weight))
    model.name_or_path = name_of(case) + "-cls"
    model.config._name_or_path = name_of(case) + "-cls"
    model.save_pretrained(case_dir(case, "cls"))
    ids = torch.tensor([[0, 0, 5, 9, 13, 2, 40], [3, 17, 8, 40, 12, 9, 22]])
    mask = (ids != 0).long()
    reload = lambda: cls_class.from_pretrained(case_dir(case, "cls")).eval()
    with torch.no_grad():
        logits = reload()(input_ids=ids, attention_mask=mask).logits
    pm = get_peft_model(reload(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    pm.save_pretrained(case_dir(case, "cls_lora"))
    readme = case_dir(case, "cls_lora", "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    peft_model = PeftModel.from_pretrained(reload(), case_dir(case, "cls_lora")).eval()
    with torch.no_grad():
        lora_logits = peft_model(input_ids=ids, attention_mask=mask).logits
    assert (lora_logits - logits).abs().max() > 1e-2
    log(f"== {case} classifier: logits {logits.tolist()}")
    save_file(
        {"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous(),
         "lora_logits": lora_logits.contiguous()},
        case_dir(case, "cls_logits.safetensors"), metadata={"format": "pt"},
    )


# MXFP4's e2m1 values by 4-bit code (transformers' FP4_VALUES).
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def mxfp4_pack(w):
    """A stacked expert parameter `[E, in, out]` as gpt-oss's checkpoints store it: blocks
    `[E, out, in/32, 16]` (two 4-bit codes per byte, low nibble first) and scales
    `[E, out, in/32]` (the exponent + 127 of each group of 32), each group's exponent the
    smallest that fits its largest magnitude into ±6, each value the nearest code."""
    t = w.transpose(1, 2).contiguous()
    e, rows, cols = t.shape
    groups = t.reshape(e, rows, cols // 32, 32)
    amax = groups.abs().amax(-1).clamp(min=1e-30)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.pow(2.0, exp)[..., None]
    codes = (scaled[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()


def write_gpt_oss_mxfp4():
    """gpt_oss_mxfp4/: a gpt-oss checkpoint stored as the released ones are: the experts in
    MXFP4 (`*_blocks`, `*_scales`, experts 32 wide so that every group has 32 values), the
    rest in bf16, `quantization_config` mxfp4; and the logits transformers gives loading it
    in f32 (it dequantizes on a CPU)."""
    case = "gpt_oss_mxfp4"
    os.makedirs(case_dir(case, "base"))
    base = build_base("gpt_oss", {"intermediate_size": 32})
    tmp = case_dir(case, "f32_tmp")
    base.save_pretrained(tmp)
    stored = {}
    for name, t in load_file(os.path.join(tmp, "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            stored[name + "_blocks"], stored[name + "_scales"] = mxfp4_pack(t)
        else:
            stored[name] = t.to(torch.bfloat16).contiguous()
    with open(os.path.join(tmp, "config.json")) as f:
        config = json.load(f)
    shutil.rmtree(tmp)
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
        ],
    }
    with open(case_dir(case, "base", "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(stored, case_dir(case, "base", "model.safetensors"), metadata={"format": "pt"})
    ids = input_ids_for("gpt_oss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GptOssForCausalLM.from_pretrained(case_dir(case, "base"), dtype=torch.float32).eval()
    logits = logits_of(model, ids)
    change = (logits - logits_of(base, ids)).abs().max().item()
    log(f"== {case}: {len(stored)} tensors; MXFP4 moves the f32 model's logits by {change:.3f}")
    assert change > 1e-3, case
    save_file({"input_ids": ids.contiguous(), "logits": logits}, case_dir(case, "logits.safetensors"),
              metadata={"format": "pt"})


def write_yarn_params():
    """yarn_params.json: transformers' YaRN frequencies for each of YARN_PARAMS."""
    out = []
    for name, model_type, keys in YARN_PARAMS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = CONFIG_CLASSES[model_type](**copy.deepcopy(keys))
            inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
        assert inv_freq.dtype == torch.float32
        out.append(dict(name=name, config=dict(model_type=model_type, **keys),
                        inv_freq=inv_freq.tolist(), attention_factor=attention_factor))
        log(f"== yarn {name}: attention_factor {attention_factor:.6f}, {len(inv_freq)} frequencies")
    with open(os.path.join(ROOT, "yarn_params.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


def main():
    rerun_pinned()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if os.path.exists(ROOT):
        shutil.rmtree(ROOT)
    os.makedirs(ROOT)  # makes tests/fixtures/models/ too if needed; nothing else touched
    for case in CASES:
        write_case(case)
    write_gemma3_classifier()
    write_moe_classifiers()
    write_gpt_oss_mxfp4()
    write_yarn_params()
    with open(os.path.join(ROOT, "README.md"), "w") as f:
        f.write(README)
    total = 0
    for dirpath, _, files in os.walk(ROOT):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    log(f"wrote {ROOT}: {total / 1024:.0f} KiB")
    assert total < 4.5 * 1024 * 1024


if __name__ == "__main__":
    main()

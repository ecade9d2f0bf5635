"""Model configuration (a frozen dataclass) and presets."""

from __future__ import annotations

import dataclasses
import math


REMAT_POLICIES = ("none", "full", "dots_saveable")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # the gated MLP's: SwiGLU (Llama), GeGLU (Gemma: tanh-approximate gelu)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (``research.models.lora``) on the kernels named in ``targets``."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple = ("q_proj", "v_proj")  # peft's default for Llama
    dropout: float = 0.0  # on the adapter's input, in training
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank

    def __post_init__(self):
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets {self.targets!r}: choose among {', '.join(LORA_TARGETS)}")
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}: "
                             "need rank >= 1, alpha > 0, 0 <= dropout < 1")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 259
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # default d_model // n_heads
    d_ff: int = 176
    rope_theta: float = 10_000.0
    rope_scaling: tuple = ()  # Llama-3 style: (("factor", 8.0), ("low_freq_factor", 1.0), ...)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False  # Qwen2
    # Gemma: GeGLU, embeddings scaled by sqrt(d_model) on the way in, RMSNorm scaled by (1 + w)
    activation: str = "silu"
    embed_scale: bool = False
    norm_offset: float = 0.0
    attention: str | None = None  # backend; None = by platform
    segment_mask: bool = True  # False: the cross-segment contamination ablation
    block_size: int = 128  # blockwise attention block
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    max_position: int = 8192
    # activation rematerialisation per decoder layer, in training (jax.checkpoint):
    # "none"; "full" (keep only each layer's input); "dots_saveable" (keep matmul outputs)
    remat: str = "none"
    # the decoder stack as one Block with [L, ...] parameters under jax.lax.scan
    # (research.models.scan): compile time independent of depth; names layers.attn.q_proj, ...
    scan_layers: bool = False
    # low-rank adapters on the decoder's kernels (research.models.lora); None = none
    lora: LoRAConfig | None = None

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


PRESETS = {
    # tests: a few seconds on a CPU
    "tiny": ModelConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, block_size=16),
    # the demo on a 2-core CPU
    "small": ModelConfig(vocab_size=259, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, block_size=64),
    "llama2_7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008,
                             rope_theta=10_000.0, norm_eps=1e-5, tie_embeddings=False, max_position=4096),
    "llama3_8b": ModelConfig(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                             rope_theta=500_000.0, norm_eps=1e-5, tie_embeddings=False, max_position=131072,
                             rope_scaling=(("factor", 8.0), ("low_freq_factor", 1.0), ("high_freq_factor", 4.0),
                                           ("original_max_position_embeddings", 8192))),
    "mistral_7b": ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
                              rope_theta=1_000_000.0, norm_eps=1e-5, tie_embeddings=False, max_position=32768),
    "gemma_7b": ModelConfig(vocab_size=256000, d_model=3072, n_layers=28, n_heads=16, n_kv_heads=16, head_dim=256,
                            d_ff=24576, norm_eps=1e-6, tie_embeddings=True, activation="gelu_tanh", embed_scale=True,
                            norm_offset=1.0),
    "qwen2_7b": ModelConfig(vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, d_ff=18944,
                            rope_theta=1_000_000.0, norm_eps=1e-6, tie_embeddings=False, qkv_bias=True,
                            max_position=32768),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)

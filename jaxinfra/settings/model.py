"""The `model` section: the default Transformer's sizes, numerics and the architecture choices the Llama,
Mistral and Qwen families differ by (grouped KV heads, head size, norm epsilon, tied embeddings, q/k/v
biases, q/k norms, rotary scaling, a sliding window). A Hugging Face folder fills them (hub/families.py)."""
from __future__ import annotations

from dataclasses import dataclass

from jaxinfra.core.errors import UserError
from jaxinfra.settings.checks import DTYPES, at_least, knob, one_of

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # the model_type an HF export writes (hub/families.py)
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclass
class ModelConfig:
    """Decoder-only transformer sizes and numerics (the LM job's model only)."""

    vocab_size: int = knob(0, "vocabulary size; 0 = data.tokenizer's (bytes: 256, bpe:N: N), padded to a multiple "
                           "of the mesh axes the vocabulary is split over")
    d_model: int = knob(128, "width of the residual stream (the embedding size)")
    n_layers: int = knob(4, "transformer blocks")
    n_heads: int = knob(4, "attention (query) heads")
    n_kv_heads: int = knob(0, "key/value heads; 0 = model.n_heads; fewer (dividing n_heads): grouped-query attention")
    head_dim: int = knob(0, "size of one attention head (even, for rotary); 0 = model.d_model / model.n_heads")
    d_ff: int = knob(384, "hidden size of the gated MLP")
    seq_len: int = knob(128, "context length: tokens per training window (an example holds seq_len + 1)")
    rope_theta: float = knob(10000.0, "base of the rotary position embedding's frequencies")
    rope_scaling: str = knob("none", "none | linear (positions / rope_factor) | llama3 (Llama 3.1's frequency rewrite)")
    rope_factor: float = knob(1.0, "rotary scaling factor (linear, llama3)")
    rope_low_freq_factor: float = knob(1.0, "llama3 rotary scaling: low_freq_factor")
    rope_high_freq_factor: float = knob(4.0, "llama3 rotary scaling: high_freq_factor")
    rope_original_len: int = knob(8192, "llama3 rotary scaling: original_max_position_embeddings")
    norm_eps: float = knob(1e-6, "RMSNorm epsilon")
    tie_embeddings: bool = knob(False, "the output layer is the embedding table (no separate head)")
    qkv_bias: bool = knob(False, "biases on the q, k and v projections (Qwen2)")
    qk_norm: bool = knob(False, "RMSNorm of each query and key head before rotary (Qwen3)")
    sliding_window: int = knob(0, "attend to the last this many tokens only (Mistral); 0 = the whole context")
    family: str = knob("llama", f"the Hugging Face model_type an hf export writes: {' | '.join(FAMILIES)}")
    dtype: str = knob("float32", "compute dtype: float32 | bfloat16 | float16 (bfloat16 on accelerators)")
    param_dtype: str = knob("float32", "dtype of the master weights: float32 | bfloat16 | float16")
    remat: str = knob("none", "none | full | dots (keep matmul outputs, recompute the rest)")
    attention: str = knob("xla", "xla | cudnn (fused flash attention on NVIDIA GPUs, bf16/fp16 compute)")
    scan_layers: bool = knob(False, "one compiled block looped over the layers (flat compile time at depth); false "
                             "unrolls the loop: faster steps for a few small layers (1.19x, the default model on CPU)")

    @property
    def head_size(self) -> int:
        """Size of one attention head: model.head_dim, or d_model / n_heads."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: model.n_kv_heads, or one per query head."""
        return self.n_kv_heads or self.n_heads

    def logical_sizes(self) -> dict[str, tuple[str, int]]:
        """Logical axis -> (config key, size) for the divisibility checks (kv_heads: replicated when it
        does not divide, models/factory.py)."""
        return {
            "embed": ("model.d_model", self.d_model),
            "heads": ("model.n_heads", self.n_heads),
            "mlp": ("model.d_ff", self.d_ff),
            "vocab": ("model.vocab_size", self.vocab_size),
        }

    def check(self) -> None:
        """Sizes and numerics of the default Transformer."""
        one_of("model.dtype", self.dtype, DTYPES)
        one_of("model.param_dtype", self.param_dtype, DTYPES)
        one_of("model.remat", self.remat, ("none", "full", "dots"))
        one_of("model.attention", self.attention, ("xla", "cudnn"))
        one_of("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        one_of("model.family", self.family, FAMILIES)
        at_least({f"model.{k}": getattr(self, k) for k in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len")}, 1,
                 "be at least 1")
        at_least({f"model.{k}": getattr(self, k) for k in ("vocab_size", "n_kv_heads", "head_dim", "sliding_window")},
                 0, "not be negative (0: the default)")
        at_least({"model.norm_eps": self.norm_eps, "model.rope_factor": self.rope_factor}, 0, "not be negative")
        if not self.head_dim and self.d_model % self.n_heads:
            raise UserError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads} "
                            f"(or set model.head_dim)")
        if self.n_heads % self.kv_heads:
            raise UserError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.attention == "cudnn" and self.dtype == "float32":
            raise UserError("model.attention=cudnn needs model.dtype=bfloat16 or float16 (cuDNN's fused attention)")
        if self.head_size % 2:
            raise UserError(f"the head size {self.head_size} (model.head_dim, or d_model / n_heads) must be even "
                            f"for rotary positions")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise UserError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} must be above 0 and below "
                            f"model.rope_high_freq_factor={self.rope_high_freq_factor}")

"""Decoder-only transformer language model in Flax NNX.

Parameters and activations carry logical axis names only (batch, seq, embed, heads, kv_heads, kv,
mlp, vocab, norm, and layers for the stacked blocks); `mesh.rules` decides which mesh axes they map to. Activation constraints go
through the `constrain` callable the caller hands in, so this module knows nothing of meshes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxinfra.compress.quant import fake_quant
from jaxinfra.core.errors import UserError
from jaxinfra.parallel.pipeline import Stacked

if TYPE_CHECKING:
    from jaxinfra.settings.model import ModelConfig

Constrain = Callable[[jax.Array, Sequence[str | None]], jax.Array]


def no_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """The default: let the compiler choose activation shardings."""
    return x


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float,
           dtype: jnp.dtype) -> nnx.Param:
    """A normal(0, std) weight annotated with logical axis names."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), out_sharding=names)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) * scale over the last axis, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    def __init__(self, dim: int, *, eps: float, param_dtype: jnp.dtype, names: tuple[str, ...] = ("norm",)):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=names)
        self.eps = eps

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return rms_norm(x_BxTxD, self.scale[...], self.eps)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Rotary inverse frequencies (head_size / 2,), float32: theta^(-2i/head_size), then model.rope_scaling's
    rewrite (linear: / factor; llama3: transformers' `_compute_llama3_parameters`: long wavelengths / factor,
    short ones kept, a smooth blend between)."""
    half = cfg.head_size // 2
    freq_F = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == "linear":
        return freq_F / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        factor, low, high, old = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                  cfg.rope_original_len)
        wavelen_F = 2 * jnp.pi / freq_F
        scaled_F = jnp.where(wavelen_F > old / low, freq_F / factor, freq_F)
        smooth_F = (old / wavelen_F - low) / (high - low)
        blended_F = (1 - smooth_F) * scaled_F / factor + smooth_F * scaled_F
        medium_F = (wavelen_F >= old / high) & (wavelen_F <= old / low)
        return jnp.where(medium_F, blended_F, scaled_F)
    return freq_F


def rotary_at(x_BxTxHxK: jax.Array, pos_BxT: jax.Array, freq_F: jax.Array) -> jax.Array:
    """Rotary position embedding (rotate-half form) at each token's position (pos_BxT: (B, T) or (1, T))."""
    half = x_BxTxHxK.shape[-1] // 2
    angle_BxTxF = pos_BxT.astype(jnp.float32)[:, :, None] * freq_F
    sin, cos = jnp.sin(angle_BxTxF)[:, :, None, :], jnp.cos(angle_BxTxF)[:, :, None, :]
    x = x_BxTxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxK.dtype)


def window_of(cfg: ModelConfig, T: int) -> tuple[int, int] | None:
    """jax.nn.dot_product_attention's local_window_size for model.sliding_window over T keys: a query sees
    itself and the sliding_window - 1 before it (transformers' q - k < sliding_window); None when it covers T."""
    W = cfg.sliding_window
    return (W - 1, 0) if W and W < T else None


def same_document(segments_BxT: jax.Array) -> jax.Array:
    """(B, 1, T, T) boolean: query t may see key s of the same segment id (causality is applied apart)."""
    return (segments_BxT[:, :, None] == segments_BxT[:, None, :])[:, None]


class Attention(nnx.Module):
    """Causal self-attention with grouped KV heads (n_heads queries share kv_heads keys and values); query
    heads split over the mesh axes of 'heads', KV heads over those of 'kv_heads'."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, constrain: Constrain, quant_inputs: bool = False):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
        pdt = jnp.dtype(cfg.param_dtype)
        self.wq = _param(rngs, (D, H, K), ("embed", "heads", "kv"), D ** -0.5, pdt)
        self.wk = _param(rngs, (D, G, K), ("embed", "kv_heads", "kv"), D ** -0.5, pdt)
        self.wv = _param(rngs, (D, G, K), ("embed", "kv_heads", "kv"), D ** -0.5, pdt)
        self.wo = _param(rngs, (H, K, D), ("heads", "kv", "embed"), (H * K * 2 * cfg.n_layers) ** -0.5, pdt)
        if cfg.qkv_bias:
            self.bq = nnx.Param(jnp.zeros((H, K), pdt), out_sharding=("heads", "kv"))
            self.bk = nnx.Param(jnp.zeros((G, K), pdt), out_sharding=("kv_heads", "kv"))
            self.bv = nnx.Param(jnp.zeros((G, K), pdt), out_sharding=("kv_heads", "kv"))
        if cfg.qk_norm:  # per head, over its K features, before rotary
            self.q_norm = RMSNorm(K, eps=cfg.norm_eps, param_dtype=pdt)
            self.k_norm = RMSNorm(K, eps=cfg.norm_eps, param_dtype=pdt)
        self.cfg, self.dtype, self.constrain = cfg, jnp.dtype(cfg.dtype), constrain
        # "cudnn": a fused (flash) kernel that never writes the T x T scores to memory. A document mask reaches
        # it as an additive bias (B, 1, T, T) in the compute dtype (0 or -2^41 in bf16) that is written, and
        # read by every layer's forward and backward kernels; its gradient is dropped (zeros from cuDNN for B > 1).
        self.impl = None if cfg.attention == "xla" else cfg.attention
        self.quant_inputs = quant_inputs  # W8A8 training: round each projection's input to int8 per token

    def _proj(self, x_BxTxD: jax.Array, w: nnx.Param, bias: str, norm: str, heads: str) -> jax.Array:
        """One of q, k, v: the projection, its bias and its head norm where the model has them."""
        y = self.constrain(jnp.einsum("btd,dhk->bthk", x_BxTxD, w[...].astype(self.dtype)),
                           ("batch", "seq", heads, "kv"))
        if hasattr(self, bias):
            y = y + getattr(self, bias)[...].astype(self.dtype)
        return getattr(self, norm)(y) if hasattr(self, norm) else y

    def __call__(self, x_BxTxD: jax.Array, segments_BxT: jax.Array | None = None,
                 positions_BxT: jax.Array | None = None) -> jax.Array:
        names = ("batch", "seq", "heads", "kv")
        T = x_BxTxD.shape[1]
        if self.quant_inputs:
            x_BxTxD = fake_quant(x_BxTxD, (2,))
        pos_BxT = jnp.arange(T, dtype=jnp.float32)[None] if positions_BxT is None else positions_BxT
        freq_F = rope_frequencies(self.cfg)
        q_BxTxHxK = rotary_at(self._proj(x_BxTxD, self.wq, "bq", "q_norm", "heads"), pos_BxT, freq_F)
        k_BxTxGxK = rotary_at(self._proj(x_BxTxD, self.wk, "bk", "k_norm", "kv_heads"), pos_BxT, freq_F)
        v_BxTxGxK = self._proj(x_BxTxD, self.wv, "bv", "", "kv_heads")
        mask_Bx1xTxT = None
        if segments_BxT is not None:
            if self.impl == "cudnn" and T % 2:  # else a NotImplementedError once the step is differentiated
                raise UserError(f"model.attention=cudnn with document masking (a mask is a bias to cuDNN) needs an "
                                f"even sequence length in training, got {T}: make model.seq_len even")
            # rebuilt in every layer: a compare of (B, T) ids, cheaper than carrying a (B, T, T) side input.
            # Batch split as q's, sequence whole: what cuDNN's partitioner requires of a bias.
            mask_Bx1xTxT = self.constrain(same_document(segments_BxT), ("batch", None, None, None))
        o_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxGxK, v_BxTxGxK, mask=mask_Bx1xTxT, is_causal=True,
                                                 local_window_size=window_of(self.cfg, T), implementation=self.impl)
        o_BxTxHxK = self.constrain(o_BxTxHxK, names)
        if self.quant_inputs:
            o_BxTxHxK = fake_quant(o_BxTxHxK, (2, 3))
        return jnp.einsum("bthk,hkd->btd", o_BxTxHxK, self.wo[...].astype(self.dtype))


class GatedMLP(nnx.Module):
    """SwiGLU feed-forward; the hidden dimension is split over the mesh axes of 'mlp'."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, constrain: Constrain, quant_inputs: bool = False):
        D, F = cfg.d_model, cfg.d_ff
        pdt = jnp.dtype(cfg.param_dtype)
        self.w_gate = _param(rngs, (D, F), ("embed", "mlp"), D ** -0.5, pdt)
        self.w_up = _param(rngs, (D, F), ("embed", "mlp"), D ** -0.5, pdt)
        self.w_down = _param(rngs, (F, D), ("mlp", "embed"), (F * 2 * cfg.n_layers) ** -0.5, pdt)
        self.dtype, self.constrain, self.quant_inputs = jnp.dtype(cfg.dtype), constrain, quant_inputs

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cast = lambda w: w[...].astype(self.dtype)
        B, T, D = x_BxTxD.shape
        if self.quant_inputs:
            x_BxTxD = fake_quant(x_BxTxD, (2,))
        # Plain (B*T, D) matrices rather than 3-D einsums: each weight gradient then contracts one
        # dimension, and XLA's CPU backend no longer writes a transposed copy of the hidden
        # activations (the MLP's backward ran 1.6x faster, same bits).
        x_NxD = x_BxTxD.reshape(B * T, D)
        gate_NxF, up_NxF = x_NxD @ cast(self.w_gate), x_NxD @ cast(self.w_up)
        h_BxTxF = self.constrain((jax.nn.silu(gate_NxF) * up_NxF).reshape(B, T, -1), ("batch", "seq", "mlp"))
        if self.quant_inputs:
            h_BxTxF = fake_quant(h_BxTxF, (2,))
        return (h_BxTxF.reshape(B * T, -1) @ cast(self.w_down)).reshape(B, T, D)


class Block(nnx.Module):
    """Pre-norm residual block: attention then gated MLP."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, constrain: Constrain, quant_inputs: bool = False):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        self.attn = Attention(cfg, rngs=rngs, constrain=constrain, quant_inputs=quant_inputs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        self.mlp = GatedMLP(cfg, rngs=rngs, constrain=constrain, quant_inputs=quant_inputs)
        self.constrain = constrain

    def __call__(self, x_BxTxD: jax.Array, segments_BxT: jax.Array | None = None,
                 positions_BxT: jax.Array | None = None) -> jax.Array:
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), segments_BxT, positions_BxT)
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return self.constrain(x_BxTxD, ("batch", "seq", "embed"))


class Transformer(nnx.Module):
    """Token ids (B, T) -> next-token logits (B, T, vocab) in float32. The blocks are one Stacked
    module (parameters (n_layers, ...), scanned; pipelined over mesh.stage with `microbatches` and
    `repeats`). quant_inputs (quant.activations=int8) rounds the input of every block matmul to int8
    per token (straight-through gradients), as an int8 deployment (vLLM's W8A8) computes them; int8
    weights are the train step's business."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, constrain: Constrain = no_constraint,
                 quant_inputs: bool = False, microbatches: int = 0, repeats: int = 1):
        pdt = jnp.dtype(cfg.param_dtype)
        # tied: the table is also the output layer, so it starts at the head's scale
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                            cfg.d_model ** -0.5 if cfg.tie_embeddings else 1.0, pdt)
        # built one after another from the same rngs, as a list of blocks would be: the same initial values
        self.blocks = Stacked(lambda: Block(cfg, rngs=rngs, constrain=constrain, quant_inputs=quant_inputs),
                              cfg.n_layers, repeats=repeats, microbatches=microbatches, remat=cfg.remat,
                              unroll=not cfg.scan_layers)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdt)
        if not cfg.tie_embeddings:
            self.head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model ** -0.5, pdt)
        self.dtype, self.constrain = jnp.dtype(cfg.dtype), constrain

    def __call__(self, tokens_BxT: jax.Array, segments_BxT: jax.Array | None = None,
                 positions_BxT: jax.Array | None = None) -> jax.Array:
        """Logits; with segments_BxT (document ids, packed windows) a token attends only within its document,
        and positions_BxT (each token's place in its document) replaces 0..T-1 in rotary."""
        for name, side in (("segments", segments_BxT), ("positions", positions_BxT)):
            if side is not None and side.shape != tokens_BxT.shape:
                raise UserError(f"batch[{name!r}] has shape {tuple(side.shape)}, the tokens "
                                f"{tuple(tokens_BxT.shape)}: give one id per token")
        # Look rows up in the whole table (FSDP gathers weights anyway): a lookup into a sharded table makes
        # GSPMD replicate the result ("involuntary full rematerialization").
        table_VxD = self.constrain(self.embed[...], (None, None))
        x_BxTxD = jnp.take(table_VxD, tokens_BxT, axis=0).astype(self.dtype)
        x_BxTxD = self.constrain(x_BxTxD, ("batch", "seq", "embed"))
        # no side inputs at all without packing: the blocks then trace exactly as they always have
        side = () if segments_BxT is None and positions_BxT is None else (segments_BxT, positions_BxT)
        x_BxTxD = self.blocks(x_BxTxD, *side)
        x_BxTxD = self.final_norm(x_BxTxD)
        if hasattr(self, "head"):
            logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, self.head[...].astype(self.dtype))
        else:  # tied: the embedding table, split as it is stored (vocab over tensor)
            logits_BxTxV = jnp.einsum("btd,vd->btv", x_BxTxD, self.embed[...].astype(self.dtype))
        return self.constrain(logits_BxTxV.astype(jnp.float32), ("batch", "seq", "vocab"))


def train_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token, counted as MaxText and Megatron do: 6 x the parameters used in
    matmuls (every weight but the input embedding's lookup; a tied table counts once, as the output
    layer) plus causal attention, 12 x layers x seq_len x the query heads' width halved for the mask."""
    D, F, L, HK, GK = cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    matmul_params = L * (2 * D * HK + 2 * D * GK + 3 * D * F) + D * cfg.vocab_size
    return 6.0 * matmul_params + 6.0 * L * cfg.seq_len * HK


def lm_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy (nats) over windows of seq_len + 1 tokens; with `segments` and
    `positions` in the batch (packed documents, same shape as `tokens`) the model gets them too."""
    tokens_BxL = batch["tokens"]
    side = {f"{k}_BxT": batch[k][:, :-1] for k in ("segments", "positions") if k in batch}
    logits_BxTxV = model(tokens_BxL[:, :-1], **side)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxL[:, 1:]).mean()

"""Decoder-only transformer language model in Flax NNX.

Parameters and activations carry logical axis names only (batch, seq, embed, heads, kv, mlp,
vocab, norm, and layers for the stacked blocks); `mesh.rules` decides which mesh axes they map to. Activation constraints go
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
    from jaxinfra.settings.sections import ModelConfig

Constrain = Callable[[jax.Array, Sequence[str | None]], jax.Array]


def no_constraint(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """The default: let the compiler choose activation shardings."""
    return x


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str, ...], std: float,
           dtype: jnp.dtype) -> nnx.Param:
    """A normal(0, std) weight annotated with logical axis names."""
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), out_sharding=names)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    def __init__(self, dim: int, *, param_dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x = x_BxTxD.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return (y * self.scale[...].astype(jnp.float32)).astype(x_BxTxD.dtype)


def rotary_at(x_BxTxHxK: jax.Array, pos_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) at each token's position (pos_BxT: (B, T) or (1, T))."""
    half = x_BxTxHxK.shape[-1] // 2
    freq_F = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxTxF = pos_BxT.astype(jnp.float32)[:, :, None] * freq_F
    sin, cos = jnp.sin(angle_BxTxF)[:, :, None, :], jnp.cos(angle_BxTxF)[:, :, None, :]
    x = x_BxTxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxK.dtype)


def rotary(x_BxTxHxK: jax.Array, theta: float) -> jax.Array:
    """rotary_at positions 0..T-1, the same for every row."""
    return rotary_at(x_BxTxHxK, jnp.arange(x_BxTxHxK.shape[1], dtype=jnp.float32)[None], theta)


def same_document(segments_BxT: jax.Array) -> jax.Array:
    """(B, 1, T, T) boolean: query t may see key s of the same segment id (causality is applied apart)."""
    return (segments_BxT[:, :, None] == segments_BxT[:, None, :])[:, None]


class Attention(nnx.Module):
    """Causal multi-head self-attention; heads split over the mesh axes of 'heads'."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, constrain: Constrain, quant_inputs: bool = False):
        D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.wq = _param(rngs, (D, H, K), ("embed", "heads", "kv"), D ** -0.5, pdt)
        self.wk = _param(rngs, (D, H, K), ("embed", "heads", "kv"), D ** -0.5, pdt)
        self.wv = _param(rngs, (D, H, K), ("embed", "heads", "kv"), D ** -0.5, pdt)
        self.wo = _param(rngs, (H, K, D), ("heads", "kv", "embed"), (D * 2 * cfg.n_layers) ** -0.5, pdt)
        self.dtype, self.theta, self.constrain = jnp.dtype(cfg.dtype), cfg.rope_theta, constrain
        # "cudnn": a fused (flash) kernel that never writes the T x T scores to memory. A document mask reaches
        # it as an additive bias (B, 1, T, T) in the compute dtype (0 or -2^41 in bf16) that is written, and
        # read by every layer's forward and backward kernels; its gradient is dropped (zeros from cuDNN for B > 1).
        self.impl = None if cfg.attention == "xla" else cfg.attention
        self.quant_inputs = quant_inputs  # W8A8 training: round each projection's input to int8 per token

    def __call__(self, x_BxTxD: jax.Array, segments_BxT: jax.Array | None = None,
                 positions_BxT: jax.Array | None = None) -> jax.Array:
        names = ("batch", "seq", "heads", "kv")
        if self.quant_inputs:
            x_BxTxD = fake_quant(x_BxTxD, (2,))
        proj = lambda w: self.constrain(jnp.einsum("btd,dhk->bthk", x_BxTxD, w[...].astype(self.dtype)), names)
        rope = ((lambda x: rotary(x, self.theta)) if positions_BxT is None
                else (lambda x: rotary_at(x, positions_BxT, self.theta)))
        q_BxTxHxK = rope(proj(self.wq))
        k_BxTxHxK = rope(proj(self.wk))
        v_BxTxHxK = proj(self.wv)
        mask_Bx1xTxT = None
        if segments_BxT is not None:
            T = x_BxTxD.shape[1]
            if self.impl == "cudnn" and T % 2:  # else a NotImplementedError once the step is differentiated
                raise UserError(f"model.attention=cudnn with document masking (a mask is a bias to cuDNN) needs an "
                                f"even sequence length in training, got {T}: make model.seq_len even")
            # rebuilt in every layer: a compare of (B, T) ids, cheaper than carrying a (B, T, T) side input.
            # Batch split as q's, sequence whole: what cuDNN's partitioner requires of a bias.
            mask_Bx1xTxT = self.constrain(same_document(segments_BxT), ("batch", None, None, None))
        o_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask=mask_Bx1xTxT, is_causal=True,
                                                 implementation=self.impl)
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
        self.attn_norm = RMSNorm(cfg.d_model, param_dtype=pdt)
        self.attn = Attention(cfg, rngs=rngs, constrain=constrain, quant_inputs=quant_inputs)
        self.mlp_norm = RMSNorm(cfg.d_model, param_dtype=pdt)
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
        self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 1.0, pdt)
        # built one after another from the same rngs, as a list of blocks would be: the same initial values
        self.blocks = Stacked(lambda: Block(cfg, rngs=rngs, constrain=constrain, quant_inputs=quant_inputs),
                              cfg.n_layers, repeats=repeats, microbatches=microbatches, remat=cfg.remat,
                              unroll=not cfg.scan_layers)
        self.final_norm = RMSNorm(cfg.d_model, param_dtype=pdt)
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
        logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, self.head[...].astype(self.dtype))
        return self.constrain(logits_BxTxV.astype(jnp.float32), ("batch", "seq", "vocab"))


def train_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token, counted as MaxText and Megatron do: 6 x the parameters used in
    matmuls (every weight but the input embedding, a lookup) plus causal attention, 12 x layers x
    seq_len x d_model halved for the mask."""
    D, F, L = cfg.d_model, cfg.d_ff, cfg.n_layers
    matmul_params = L * (4 * D * D + 3 * D * F) + D * cfg.vocab_size
    return 6.0 * matmul_params + 6.0 * L * cfg.seq_len * D


def lm_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy (nats) over windows of seq_len + 1 tokens; with `segments` and
    `positions` in the batch (packed documents, same shape as `tokens`) the model gets them too."""
    tokens_BxL = batch["tokens"]
    side = {f"{k}_BxT": batch[k][:, :-1] for k in ("segments", "positions") if k in batch}
    logits_BxTxV = model(tokens_BxL[:, :-1], **side)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, tokens_BxL[:, 1:]).mean()

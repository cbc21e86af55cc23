"""KV-cache decoding for the default Transformer (jaxinfra/models/transformer.py): one jitted call prefills the prompts
and decodes every new token in a `lax.fori_loop`, with no host round trip per token.

Pure functions of the parameter tree `sampling.sample` receives (`nnx.to_pure_dict` of the model's Params;
any kernel may be a `quant.QTensor`) and the ModelConfig, with transformer.py's numerics: RMSNorm in float32,
rotary (rotate-half, scaled as the model's) at each token's absolute position, q/k/v biases and q/k norms where the
model has them, SwiGLU, JAX's causal attention in the compute dtype (model.sliding_window honoured), float32 logits.
The cache holds the KV heads' K and V per layer, (batch, kv_heads, seq_len, head_size): a ring of seq_len
slots, the token at position p in slot p % seq_len. Within seq_len tokens the output is the model's; beyond,
each token attends to the last seq_len tokens' cached K and V at their absolute positions (rotary is
relative, so that is well defined): a rolling cache, not sampling.sample's sliding window, which
recomputes the window's K and V without the tokens that fell out of it.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra.compress.quant import QTensor, dequantize, fake_quant
from jaxinfra.core.errors import UserError
from jaxinfra.data.tokenizer import Tokenizer
from jaxinfra.models.sampling import prompt_ids
from jaxinfra.models.transformer import Transformer, rms_norm, rope_frequencies, rotary_at  # the model's own numerics
from jaxinfra.parallel import sharding as shd

if TYPE_CHECKING:
    from jaxinfra.settings.model import ModelConfig

# Heads before slots: the attention dots then read the cache as it lies. In (B, S, H, K) order XLA's CPU
# backend wrote a transposed copy of every layer's K and V each token (decoding batch 8 ran 2x slower).
CACHE_NAMES = ("batch", "kv_heads", "seq", "kv")
Cache = tuple[tuple[jax.Array, jax.Array], ...]  # (K, V) per layer, each (B, G, seq_len, K): the KV heads only


def dot(x: jax.Array, w: jax.Array | QTensor, n_in: int, dtype: jnp.dtype) -> jax.Array:
    """x's last n_in dims contracted with kernel w's first n_in (its input features), in `dtype`.

    A QTensor multiplies its int8 values cast to `dtype` and scales after the matmul: its scale is 1 along
    the contracted dims, so (x @ values) * scale is x @ (values * scale), and no float kernel is made.
    """
    if isinstance(w, QTensor):
        y = jnp.tensordot(x, w.values.astype(dtype), axes=n_in)
        return y * w.scale.reshape(w.scale.shape[n_in:]).astype(dtype)
    return jnp.tensordot(x, w.astype(dtype), axes=n_in)


def _embed(table: jax.Array | QTensor, tokens_BxT: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows of the embedding table; a QTensor's rows dequantized as quant.dequantize does."""
    if not isinstance(table, QTensor):
        return jnp.take(table, tokens_BxT, axis=0).astype(dtype)
    scale = table.scale if table.scale.shape[0] == 1 else jnp.take(table.scale, tokens_BxT, axis=0)
    return (jnp.take(table.values, tokens_BxT, axis=0).astype(scale.dtype) * scale).astype(dtype)


def _qkv(h_BxTxD: jax.Array, a: Any, which: str, dtype: jnp.dtype, eps: float, constrain: Callable) -> jax.Array:
    """One of q, k, v ("q", "k" or "v") as the model's Attention makes it: projection, bias, head norm."""
    y = constrain(dot(h_BxTxD, a[f"w{which}"], 1, dtype), ("batch", "seq", "heads" if which == "q" else "kv_heads", "kv"))
    if f"b{which}" in a:
        y = y + a[f"b{which}"].astype(dtype)
    return rms_norm(y, a[f"{which}_norm"]["scale"], eps) if f"{which}_norm" in a else y


def _blocks(params: Any) -> list[Any]:
    """The blocks in layer order, one tree each: a list as given, or the layers of model.py's Stacked
    blocks (arrays and QTensors (L, ...) sliced; logical names lose their leading `layers`)."""
    blocks = params["blocks"]
    if isinstance(blocks, (list, tuple)):
        return list(blocks)
    is_names = lambda x: isinstance(x, P)
    first = jax.tree.leaves(blocks, is_leaf=is_names)[0]
    if is_names(first):
        return [jax.tree.map(lambda n: P(*n[1:]), blocks, is_leaf=is_names)]  # every layer alike
    return [jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(first.shape[0])]


def forward(params: Any, cfg: ModelConfig, tokens_BxT: jax.Array, pos_BxT: jax.Array, cache: Cache,
            dtype: jnp.dtype, constrain: Callable = lambda x, names: x, quant_inputs: bool = False
            ) -> tuple[jax.Array, Cache]:
    """Float32 logits (B, T, V) of T tokens per row at consecutive absolute positions pos_BxT: a prefill
    (T <= seq_len from position 0) or a decode step (T = 1). Their K and V go into the cache first; each
    token attends to the cached tokens at or before its position. quant_inputs rounds each block
    matmul's input to int8 per token, as a W8A8 QAT model does (model.Transformer's quant_inputs)."""
    rnd = (lambda x, dims: fake_quant(x, dims)) if quant_inputs else (lambda x, dims: x)
    S, names, eps, freq_F = cfg.seq_len, ("batch", "seq", "heads", "kv"), cfg.norm_eps, rope_frequencies(cfg)
    newest_B = pos_BxT[:, -1]
    # the position each slot holds once this call's tokens are in (negative: never written)
    slot_pos_BxS = newest_B[:, None] - (newest_B[:, None] - jnp.arange(S)) % S
    seen_BxTxS = (slot_pos_BxS[:, None, :] >= 0) & (slot_pos_BxS[:, None, :] <= pos_BxT[:, :, None])
    if cfg.sliding_window:  # the model's window: a query sees keys less than sliding_window positions back
        seen_BxTxS &= pos_BxT[:, :, None] - slot_pos_BxS[:, None, :] < cfg.sliding_window
    mask_Bx1xTxS = seen_BxTxS[:, None]
    # Each row writes from its own slot. A dynamic_update_slice per row, not a scatter: GSPMD keeps it on the
    # row's batch shard, where a scatter all-gathered every layer's new K and V over the batch axes each token.
    start_B = pos_BxT[:, 0] % S
    write = lambda c_BxHxSxK, new_BxTxHxK: constrain(jax.vmap(jax.lax.dynamic_update_slice_in_dim, (0, 0, 0, None))(
        c_BxHxSxK, new_BxTxHxK.transpose(0, 2, 1, 3), start_B, 1), CACHE_NAMES)
    # the whole table, as the model looks it up: a lookup in a vocab-split table all-reduces every token
    table = jax.tree.map(lambda t: constrain(t, (None,) * t.ndim), params["embed"])
    x_BxTxD = constrain(_embed(table, tokens_BxT, dtype), ("batch", "seq", "embed"))
    new_cache = []
    for blk, (k_BxGxSxK, v_BxGxSxK) in zip(_blocks(params), cache):
        a, m = blk["attn"], blk["mlp"]
        h_BxTxD = rnd(rms_norm(x_BxTxD, blk["attn_norm"]["scale"], eps), (2,))
        q_BxTxHxK = rotary_at(_qkv(h_BxTxD, a, "q", dtype, eps, constrain), pos_BxT, freq_F)
        k_BxGxSxK = write(k_BxGxSxK, rotary_at(_qkv(h_BxTxD, a, "k", dtype, eps, constrain), pos_BxT, freq_F))
        v_BxGxSxK = write(v_BxGxSxK, _qkv(h_BxTxD, a, "v", dtype, eps, constrain))
        new_cache.append((k_BxGxSxK, v_BxGxSxK))
        # JAX's XLA attention, as the model calls it: same scale, float32 softmax, same masked value
        o_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxGxSxK.transpose(0, 2, 1, 3),
                                                 v_BxGxSxK.transpose(0, 2, 1, 3), mask=mask_Bx1xTxS,
                                                 implementation="xla")
        x_BxTxD = x_BxTxD + dot(rnd(constrain(o_BxTxHxK, names), (2, 3)), a["wo"], 2, dtype)
        h_BxTxD = rnd(rms_norm(x_BxTxD, blk["mlp_norm"]["scale"], eps), (2,))
        f_BxTxF = jax.nn.silu(dot(h_BxTxD, m["w_gate"], 1, dtype)) * dot(h_BxTxD, m["w_up"], 1, dtype)
        f_BxTxF = rnd(constrain(f_BxTxF, ("batch", "seq", "mlp")), (2,))
        x_BxTxD = constrain(x_BxTxD + dot(f_BxTxF, m["w_down"], 1, dtype), ("batch", "seq", "embed"))
    x_BxTxD = rms_norm(x_BxTxD, params["final_norm"]["scale"], eps)
    if "head" in params:
        logits_BxTxV = dot(x_BxTxD, params["head"], 1, dtype).astype(jnp.float32)
    else:  # tied: the embedding table is the output layer
        table_VxD = dequantize(params["embed"]) if isinstance(params["embed"], QTensor) else params["embed"]
        logits_BxTxV = jnp.einsum("btd,vd->btv", x_BxTxD, table_VxD.astype(dtype)).astype(jnp.float32)
    return constrain(logits_BxTxV, ("batch", "seq", "vocab")), tuple(new_cache)


def cache_bytes(cfg: ModelConfig, batch: int, dtype: Any = None) -> int:
    """Bytes of the K and V cache: 2 x n_layers x batch x seq_len x kv_heads x head_size x itemsize."""
    itemsize = jnp.dtype(dtype or cfg.dtype).itemsize
    return 2 * cfg.n_layers * batch * cfg.seq_len * cfg.kv_heads * cfg.head_size * itemsize


def _weight_shardings(params: Any, cfg: ModelConfig, mesh: Mesh, rules: shd.Rules) -> Any:
    """Decode-time shardings from model.py's own logical names and the rules less the batch axes: each batch
    shard holds whole weights, gathered once before the loop rather than in every layer of every token as
    FSDP training gathers them; the other axes (tensor) still split heads, mlp and vocab."""
    found: dict[str, Any] = {}

    def names() -> None:  # traced only: nothing is allocated
        with nnx.use_eager_sharding(False):
            model = Transformer(cfg, rngs=nnx.Rngs(0))
        found["names"] = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))

    jax.eval_shape(names)
    batch_axes = set(rules.get("batch", ()))
    weight_rules = {k: tuple(a for a in v if a not in batch_axes) for k, v in rules.items()}

    def one(names: P, leaf: Any) -> Any:
        if isinstance(leaf, QTensor):  # a scale's size-1 dims cannot split
            scale = [n if s > 1 else None for n, s in zip(names, leaf.scale.shape)]
            return QTensor(shd.named(mesh, tuple(names), weight_rules), shd.named(mesh, scale, weight_rules))
        return shd.named(mesh, tuple(names), weight_rules)
    layers = _blocks(params)
    names_of = {**found["names"], "blocks": _blocks(found["names"]) * len(layers)}
    return jax.tree.map(one, names_of, {**params, "blocks": layers}, is_leaf=lambda x: isinstance(x, P))


_PROGRAMS: dict[Any, Any] = {}  # the newest few compiled generations: a repeated call neither traces nor compiles
_KEEP = 8


class Shape(NamedTuple):
    """What one compiled generation is specialised to, besides the weights, the config and the mesh."""

    B: int  # rows, padded to split over the batch axes
    Tp: int  # prompt length, padded
    n_tokens: int
    greedy: bool
    keep_logits: bool
    dtype: jnp.dtype
    quant_inputs: bool  # matmul inputs rounded to int8 per token (W8A8 QAT)


def _program(params: Any, cfg: ModelConfig, shape: Shape, mesh: Mesh, rules: shd.Rules, args: tuple
             ) -> tuple[Any, float]:
    """(compiled generation, compile seconds): prefill the (B, Tp) prompts, then n_tokens - 1 decode steps."""
    B, Tp, n_tokens, greedy, keep_logits, dtype, quant_inputs = shape
    key = (dataclasses.astuple(cfg), *shape[:5], dtype.name, quant_inputs, mesh,
           tuple(sorted(rules.items())), jax.tree.structure(params),
           tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(params)))
    if key in _PROGRAMS:
        _PROGRAMS[key] = _PROGRAMS.pop(key)  # newest last
        return _PROGRAMS[key], 0.0
    w_sh = _weight_shardings(params, cfg, mesh, rules)
    constrain = shd.LogicalConstraint(mesh, rules)

    def pick(logits_BxV: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
        """Next tokens as sampling.sample picks them: argmax, or a categorical draw at `temperature`."""
        # whole rows first: one all-gather, where an argmax over split vocab gathers maxima and indices apart
        logits_BxV = constrain(logits_BxV, ("batch", None))
        if greedy:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, logits_BxV / temperature, axis=-1).astype(jnp.int32)

    def decode_all(p: Any, prompt_BxT: jax.Array, len_B: jax.Array, key_data: jax.Array, temperature: jax.Array) -> Any:
        p = jax.lax.with_sharding_constraint({**p, "blocks": _blocks(p)}, w_sh)  # before the loop: gathered once
        zeros = lambda: constrain(jnp.zeros((B, cfg.kv_heads, cfg.seq_len, cfg.head_size), dtype), CACHE_NAMES)
        cache = tuple((zeros(), zeros()) for _ in range(cfg.n_layers))
        pos_BxT = jnp.broadcast_to(jnp.arange(Tp, dtype=jnp.int32), (B, Tp))
        logits_BxTxV, cache = forward(p, cfg, prompt_BxT, pos_BxT, cache, dtype, constrain, quant_inputs)
        logits_BxV = jnp.take_along_axis(logits_BxTxV, (len_B - 1)[:, None, None], axis=1)[:, 0]
        rng, sub = jax.random.split(jax.random.wrap_key_data(key_data))  # sampling.sample's key chain
        out_BxN = jnp.zeros((B, n_tokens), jnp.int32).at[:, 0].set(pick(logits_BxV, sub, temperature))
        seen_BxNxV = jnp.zeros((B, n_tokens if keep_logits else 0, cfg.vocab_size), jnp.float32)
        seen_BxNxV = seen_BxNxV.at[:, 0].set(logits_BxV) if keep_logits else seen_BxNxV

        def step(t: jax.Array, carry: Any) -> Any:
            cache, rng, out_BxN, seen_BxNxV = carry
            pos_Bx1 = (len_B + t - 1)[:, None]  # the token picked at step t - 1 sits at its row's len + t - 1
            logits_Bx1xV, cache = forward(p, cfg, out_BxN[:, t - 1][:, None], pos_Bx1, cache, dtype, constrain,
                                          quant_inputs)
            rng, sub = jax.random.split(rng)
            out_BxN = out_BxN.at[:, t].set(pick(logits_Bx1xV[:, 0], sub, temperature))
            if keep_logits:
                seen_BxNxV = seen_BxNxV.at[:, t].set(logits_Bx1xV[:, 0])
            return cache, rng, out_BxN, seen_BxNxV

        _, _, out_BxN, seen_BxNxV = jax.lax.fori_loop(1, n_tokens, step, (cache, rng, out_BxN, seen_BxNxV))
        return out_BxN, seen_BxNxV

    t0 = time.perf_counter()
    _PROGRAMS[key] = compiled = jax.jit(decode_all).lower(params, *args).compile()
    while len(_PROGRAMS) > _KEEP:
        del _PROGRAMS[next(iter(_PROGRAMS))]
    return compiled, time.perf_counter() - t0


def _rows(prompts: Sequence[str | Sequence[int]], vocab_size: int, tokenizer: Tokenizer | None) -> list[list[int]]:
    """Token rows: a string's ids from the tokenizer (sampling.prompt_ids's checks), or token ids."""
    if not len(prompts):
        raise UserError("prompts: give at least one prompt")
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise TypeError("decode.generate: text prompts need tokenizer= (the run's, data.tokenizer.run_tokenizer)")
    rows = [prompt_ids(p, tokenizer, vocab_size) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
    for p, row in zip(prompts, rows):
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad or not row:
            raise UserError(f"prompt {p!r}: " + (f"token {bad[0]} is outside the model's vocab_size={vocab_size}"
                                                  if bad else "empty: give at least one token"))
    return rows


def generate(params: Any, cfg: ModelConfig, prompts: Sequence[str | Sequence[int]], *, n_tokens: int,
             temperature: float, seed: int, mesh: Mesh, rules: shd.Rules, tokenizer: Tokenizer | None = None,
             dtype: Any = None, keep_logits: bool = False, quant_inputs: bool = False
             ) -> tuple[list[list[int]], dict[str, Any]]:
    """n_tokens new tokens after each prompt (a str: its ids from `tokenizer`; or token ids), in one compiled call
    (quant_inputs: matmul inputs rounded to int8 per token, for a W8A8 QAT run).

    Returns (new tokens per prompt, info): cache_bytes, peak_bytes (the compiled call's arguments, outputs
    and temporaries: weights, cache and all), compile_s (0 when reused), decode_s (the call),
    tokens_per_s (the prompts' new tokens per second of decode_s), batch (padded to split over the batch
    axes) and, with keep_logits, logits (prompts x n_tokens x vocab, float32: what each token was picked
    from). A prompt longer than seq_len keeps its last seq_len tokens, as sampling.sample's window does.
    """
    if n_tokens < 1:
        raise UserError(f"n_tokens={n_tokens}: generate at least 1 token")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must not be negative (0 = greedy)")
    rows = [r[-cfg.seq_len:] for r in _rows(prompts, cfg.vocab_size, tokenizer)]
    rules = {k: tuple(v) for k, v in rules.items()}
    divisor = shd.batch_divisor(mesh, rules)
    B = -(-len(rows) // divisor) * divisor  # pad the batch so it splits over the batch axes
    # prompts padded to a power of two, 16 to seq_len: few distinct programs; no token attends to a pad
    Tp = min(cfg.seq_len, max(16, 1 << (max(map(len, rows)) - 1).bit_length()))
    prompt_BxT, len_B = np.zeros((B, Tp), np.int32), np.zeros((B,), np.int32)
    for i in range(B):
        row = rows[i] if i < len(rows) else rows[0]  # padding rows repeat the first prompt
        prompt_BxT[i, :len(row)], len_B[i] = row, len(row)
    # every process holds the same rows: each device takes its slice of the host copy
    place = lambda x: jax.make_array_from_callback(x.shape, NamedSharding(mesh, shd.batch_spec(rules, x.ndim)),
                                                   lambda idx: x[idx])
    # the key as host data: the same value in every process, whatever device jax.random.key would pick
    args = (place(prompt_BxT), place(len_B), np.asarray(jax.random.key_data(jax.random.key(seed))),
            np.float32(temperature or 1))
    dtype = jnp.dtype(dtype or cfg.dtype)
    on_mesh = lambda x: isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat)
    if not all(map(on_mesh, jax.tree.leaves(params))):  # host arrays, or another device's: onto the mesh
        params = jax.device_put({**params, "blocks": _blocks(params)}, _weight_shardings(params, cfg, mesh, rules))
    with jax.set_mesh(mesh):
        compiled, compile_s = _program(params, cfg, Shape(B, Tp, n_tokens, temperature == 0, keep_logits, dtype,
                                                          quant_inputs), mesh, rules, args)
        t0 = time.perf_counter()
        out_BxN, logits_BxNxV = shd.gather(compiled(params, *args))
        decode_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()  # what the one call holds at once: weights, prompts, cache, temporaries
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes if memory else 0
    info = {"cache_bytes": cache_bytes(cfg, B, dtype), "peak_bytes": int(peak), "compile_s": compile_s,
            "decode_s": decode_s, "tokens_per_s": len(rows) * n_tokens / decode_s, "batch": B, "prompt_pad": Tp}
    if keep_logits:
        info["logits"] = logits_BxNxV[:len(rows)]
    return [r.tolist() for r in out_BxN[:len(rows)]], info

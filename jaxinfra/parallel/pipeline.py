"""Stacked layers and pipeline parallelism over the `stage` mesh axis.

`Stacked(make, n)` builds n copies of a block (make() each, drawing random numbers in order, as a
Python list of blocks would) and stores them as one block whose parameters carry a leading
(n_layers,) dimension named by the logical axis `layers` ((repeats, layers) for a circular
schedule). Calling it runs the layers in order (a `lax.scan` over one traced block, unrolled unless
model.scan_layers) when the mesh has no stage axis, else the pipeline below. Parameter paths stay the block's own (`blocks/attn/wq`,
shape (L, D, H, K)); checkpoints name whole layers `blocks.N.attn.wq` wherever a user reads
tensors (exports, init_from, the HF folder), through `core.names.layer_names`.

The pipeline (GPipe, circular when repeats > 1) is a `shard_map` manual over `stage` only: data,
fsdp and tensor stay GSPMD's inside each stage. A step's batch splits into M micro-batches; each of
the R x M + S - 1 iterations runs one micro-batch through every stage's C = L / (S R) layers and
shifts the results one stage on with a `ppermute` (a collective-permute); the last stage's output
returns to stage 0 for the next repeat. Which (micro-batch, repeat) each stage runs at each
iteration is one table (`schedule`): the same table drives the computation and counts the bubble,
(S - 1) / (R M + S - 1) of all stage-iterations.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfra.core.errors import UserError

STAGE = "stage"  # the mesh axis the layers split over
LAYERS = "layers"  # the logical axis of a stacked parameter's layer dimension
REPEATS = "repeats"  # the leading dimension of a circular schedule's layers (never sharded)

REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def schedule(stages: int, microbatches: int, repeats: int = 1) -> np.ndarray:
    """(iterations, stages) table of the work item k = repeat * M + micro-batch each stage runs at each
    iteration, -1 where it idles: stage s runs item t - s at iteration t (GPipe's diagonal)."""
    T = repeats * microbatches + stages - 1
    k = np.arange(T)[:, None] - np.arange(stages)[None, :]
    return np.where((k >= 0) & (k < repeats * microbatches), k, -1).astype(np.int32)


def idle_fraction(table: np.ndarray) -> float:
    """Share of stage-iterations with nothing to run (the pipeline's bubble), counted from the table."""
    return float(np.mean(table < 0))


def _stack(*variables: nnx.Variable, lead: tuple[str, ...], shape: tuple[int, ...]) -> nnx.Variable:
    """One variable of the stacked block: the layers' values stacked, its logical names led by `lead`."""
    first = variables[0]
    meta = dict(first.get_metadata())
    names = meta.get("out_sharding") or (None,) * first[...].ndim
    meta["out_sharding"] = lead + tuple(names)
    value = jnp.stack([v[...] for v in variables]).reshape(shape + first[...].shape)
    return type(first)(value, **meta)


class Stacked(nnx.Module):
    """n copies of make()'s block as one block with stacked parameters (the `layers` logical axis),
    called as the n layers in sequence; split over the mesh's stage axis when it has one.

    Mark a model's repeated block this way to pipeline it (`mesh.stage` > 1): the block takes and
    returns one activation of the same shape (any side inputs, e.g. segment ids, are passed to every
    layer as they are: `block(h, *side)`), and holds parameters only (no batch statistics or
    RNG streams: each stage would need its own). `unroll` compiles every layer's ops apart (the scan
    unrolled): measured 1.19x faster steps for the default model's 4 small layers on CPU, but compile
    time then grows with depth, which a scan keeps flat (benchmarks/pipeline.py).
    """

    def __init__(self, make: Callable[[], nnx.Module], n: int, *, repeats: int = 1, microbatches: int = 0,
                 remat: str = "none", unroll: bool = False):
        if n < 1 or n % repeats:
            raise UserError(f"Stacked: {n} layers do not split into pipeline.repeats={repeats} equal groups")
        layers = [make() for _ in range(n)]
        graphdef, *states = nnx.split(layers[0], nnx.Param, ...)
        if any(jax.tree.leaves(s) for s in states[1:]):
            raise UserError(f"Stacked: the repeated {type(layers[0]).__name__} holds variables other than "
                            f"nnx.Param (batch statistics or RNG streams), which stacked layers cannot carry")
        for other in layers[1:]:
            if nnx.graphdef(other) != nnx.graphdef(layers[0]):
                raise UserError(f"Stacked: the {n} blocks differ in structure; every layer must be built alike")
        lead, shape = ((REPEATS, LAYERS), (repeats, n // repeats)) if repeats > 1 else ((LAYERS,), (n,))
        stacked = jax.tree.map(lambda *vs: _stack(*vs, lead=lead, shape=shape),
                               *[nnx.state(layer, nnx.Param) for layer in layers],
                               is_leaf=lambda x: isinstance(x, nnx.Variable))
        block = nnx.merge(graphdef, stacked)
        for name, child in vars(block).items():  # the block's own attribute names: paths stay blocks/attn/wq
            if not name.startswith("_"):
                setattr(self, name, child)
        self.block_def = graphdef
        self.n_layers, self.repeats, self.microbatches, self.remat = n, repeats, microbatches, remat
        self.unroll = unroll

    def __call__(self, x: jax.Array, *side: Any) -> jax.Array:
        """The layers in order on x; `side` (arrays or None, batch first, e.g. segment ids) reaches every
        layer unchanged: block(h, *side)."""
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        apply = lambda p, h, *s: nnx.merge(self.block_def, p)(h, *s)
        if self.remat != "none":
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[self.remat])
        mesh = jax.sharding.get_abstract_mesh()
        stages = dict(mesh.shape).get(STAGE, 1) if not mesh.empty else 1
        if stages == 1:
            flat = jax.tree.map(lambda a: a.reshape((self.n_layers,) + a.shape[(2 if self.repeats > 1 else 1):]),
                                params)
            return jax.lax.scan(lambda h, p: (apply(p, h, *side), None), x, flat, unroll=self.unroll)[0]
        return pipeline(apply, params, x, *side, stages=stages, microbatches=self.microbatches or stages,
                        repeats=self.repeats, unroll=self.unroll)


def pipeline(apply: Callable[..., jax.Array], params: Any, x: jax.Array, *side: Any, stages: int,
             microbatches: int, repeats: int = 1, unroll: bool = False) -> jax.Array:
    """The layers stacked in `params` applied in order to x (batch first), pipelined over the stage
    axis of the mesh in scope: GPipe, circular when repeats > 1. `side` inputs (batch first; None
    allowed) split into the same micro-batches as x: apply(p, h, *side_of_h's_micro_batch)."""
    S, R, M, B = stages, repeats, microbatches, x.shape[0]
    table = jnp.asarray(schedule(S, M, R))

    def split(a: jax.Array) -> jax.Array:
        """(B, ...) -> (M, B / M, ...): micro-batch m = rows m, M + m, 2M + m, ... (every device keeps the
        rows it holds, no resharding); a batch the micro-batches do not divide (an eval or sampling batch)
        is padded with zero rows (rows are independent)."""
        if B % M:
            a = jnp.concatenate([a, jnp.zeros((M - B % M,) + a.shape[1:], a.dtype)])
        return a.reshape((a.shape[0] // M, M) + a.shape[1:]).swapaxes(0, 1)

    x_MxBm = split(x)
    side_leaves, side_def = jax.tree.flatten(jax.tree.map(split, side))  # None entries carry no leaves
    layer_spec = jax.P(None, STAGE) if R > 1 else jax.P(STAGE)
    last = S - 1

    def run_stage(w: Any, h: jax.Array, sides: tuple) -> jax.Array:
        return jax.lax.scan(lambda h, p: (apply(p, h, *sides), None), h, w, unroll=unroll)[0]

    def body(w: Any, xs: jax.Array, side_MxBm: list) -> jax.Array:
        w = w if R > 1 else jax.tree.map(lambda a: a[None], w)  # (R, C, ...): this stage's layer groups
        s = jax.lax.axis_index(STAGE)

        def iteration(carry: tuple, t: jax.Array) -> tuple[tuple, None]:
            h, inputs, outputs = carry
            k = table[t, s]
            m, r = jnp.maximum(k, 0) % M, jnp.maximum(k, 0) // M
            h = jnp.where(s == 0, jax.lax.dynamic_index_in_dim(inputs, m, keepdims=False), h)
            # the side inputs do not change between layers: each stage reads its item's micro-batch of them
            # (every stage holds them all) where the activations travel from stage to stage
            sides = jax.tree.unflatten(side_def, [jax.lax.dynamic_index_in_dim(a, m, keepdims=False)
                                                  for a in side_MxBm])
            y = run_stage(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, keepdims=False), w), h, sides)
            done = (s == last) & (k >= 0) & (r == R - 1)
            outputs = jax.lax.dynamic_update_index_in_dim(
                outputs, jnp.where(done, y, jax.lax.dynamic_index_in_dim(outputs, m, keepdims=False)), m, 0)
            # to the next stage; the last stage's output goes round to stage 0 for its next repeat
            h = jax.lax.ppermute(y, STAGE, [(i, (i + 1) % S) for i in range(S)])
            k_last = table[t, last]  # the item the arriving value finished (on stage 0's side)
            back = (s == 0) & (k_last >= 0) & (k_last < (R - 1) * M)
            m_back = jnp.maximum(k_last, 0) % M
            inputs = jax.lax.dynamic_update_index_in_dim(
                inputs, jnp.where(back, h, jax.lax.dynamic_index_in_dim(inputs, m_back, keepdims=False)), m_back, 0)
            return (h, inputs, outputs), None

        # the carry differs between stages ("varying" over stage) from the first iteration on
        init = jax.lax.pcast((jnp.zeros_like(xs[0]), xs, jnp.zeros_like(xs)), (STAGE,), to="varying")
        (_, _, outputs), _ = jax.lax.scan(iteration, init, jnp.arange(table.shape[0]))
        return jax.lax.psum(jnp.where(s == last, outputs, 0), STAGE)  # every stage continues with the output

    y_MxBm = jax.shard_map(body, in_specs=(jax.tree.map(lambda _: layer_spec, params), jax.P(),
                                           [jax.P()] * len(side_leaves)),
                           out_specs=jax.P(), axis_names={STAGE})(params, x_MxBm, side_leaves)
    return y_MxBm.swapaxes(0, 1).reshape((-1,) + x.shape[1:])[:B]


def stacked_modules(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Path ('blocks') -> leading layer dims ((L,) or (R, L / R)) of every Stacked module in a model."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Stacked):
            out["/".join(map(str, path))] = ((node.repeats, node.n_layers // node.repeats) if node.repeats > 1
                                            else (node.n_layers,))
    return out



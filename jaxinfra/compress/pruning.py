"""Magnitude pruning as an Optax transformation, computed inside the compiled step and sharding-native.

`prune(inner, ...)` wraps an optimizer: its state holds a boolean mask per pruned parameter (so
masks shard like the parameters and checkpoint with no extra code). Every update it (1) on schedule
steps recomputes the masks from the parameters under lax.cond, (2) masks the gradients and zeroes
the inner optimizer's moments at pruned coordinates, so momentum cannot revive them, (3) runs the
inner optimizer and (4) returns updates that leave pruned coordinates exactly zero.

Thresholds never gather a tensor: the k-th smallest |w| is found by bisection on the bit pattern
of |w| (for non-negative floats the uint32 order is the float order), counting `bits <= t` on each
shard and summing (a scalar all-reduce); all tensors bisect together in one loop, one vector of
counts per round. Ties at the threshold are broken by flat index with a second bisection (run only
when some tensor has to split its ties), so exactly round(s * n) entries are pruned. N:M keeps
the N largest of each group of M consecutive entries along the kernel's input-feature dimension
(`nm_axis`: dim 0 of a Linear, the input channels of a Conv), a local operation.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxinfra.core.names import path_str

Include = Callable[[tuple[Any, ...], jax.Array], bool]


def default_include(path: tuple[Any, ...], leaf: jax.Array) -> bool:
    """Without a model to trace: tensors of 2 or more dimensions not named embed or head (the
    trainer passes `roles.select(...)` instead, which reads each tensor's role from the forward pass)."""
    return leaf.ndim >= 2 and not ({"embed", "head"} & set(path_str(path).split("/")))


def erk_sparsities(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[float]:
    """Erdos-Renyi-Kernel (Evci et al. 2020): density of a tensor proportional to sum(shape) /
    prod(shape), scaled so the total is `sparsity`; tensors that would exceed density 1 stay dense."""
    sizes = [math.prod(s) for s in shapes]
    raw = [sum(s) / n for s, n in zip(shapes, sizes)]
    dense: set[int] = set()
    while True:
        budget = (1 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)
        eps = budget / sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
        over = {i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1}
        if not over:
            return [0.0 if i in dense else 1 - eps * raw[i] for i in range(len(shapes))]
        dense |= over


def cubic_sparsity(step: jax.Array, final: float, start: int, end: int) -> jax.Array:
    """Zhu & Gupta (2017): s_t = s_f (1 - (1 - p)^3), p the progress through [start, end]; 0 before."""
    p = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
    return jnp.where(step < start, 0.0, final * (1.0 - (1.0 - p) ** 3))


def _bits(x: jax.Array) -> jax.Array:
    """|x| as uint32 whose order is the order of |x| (float32 view)."""
    return jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every element, built from iotas (shards compute their own part)."""
    idx = jnp.zeros(shape, jnp.int32)
    stride = 1
    for d in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.int32, shape, d) * stride
        stride *= shape[d]
    return idx


def _bisect(count_le: Callable[[jax.Array], jax.Array], k: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Per entry g, the smallest t[g] in [lo[g], hi[g]] with count_le(t)[g] >= k[g] (33 rounds, every
    entry at once: each round is one vector of counts, not one loop per tensor)."""
    def body(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = count_le(mid) >= k
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
    return jax.lax.fori_loop(0, 33, body, (lo, hi))[0]


def _select(bits: list[jax.Array], group: list[int], k: jax.Array) -> list[jax.Array]:
    """True where kept. Group g (the leaves j with group[j] == g) prunes exactly k[g] entries: the
    smallest bits, ties broken by (leaf order, flat index). Counts are local sums plus all-reduces of
    scalars; the tie-break runs only when some group must split the entries tied at its threshold."""
    n_groups = k.shape[0]
    members = [[j for j, g in enumerate(group) if g == gi] for gi in range(n_groups)]

    def counts(pred: Callable[[int, jax.Array], jax.Array]) -> jax.Array:
        per = [jnp.sum(pred(j, b), dtype=jnp.int32) for j, b in enumerate(bits)]
        return jnp.stack([sum((per[j] for j in m), jnp.int32(0)) for m in members])

    k = k.astype(jnp.int32)
    t = _bisect(lambda t: counts(lambda j, b: b <= t[group[j]]), k,
                jnp.zeros(n_groups, jnp.uint32), jnp.full(n_groups, 0xFFFFFFFF, jnp.uint32))
    need = k - counts(lambda j, b: b < t[group[j]])  # entries equal to t that must go too
    tied = counts(lambda j, b: b == t[group[j]])
    offset, total = [0] * len(bits), [0] * n_groups
    for j, b in enumerate(bits):
        offset[j], total[group[j]] = total[group[j]], total[group[j]] + b.size
    index = [_flat_index(b.shape) + offset[j] for j, b in enumerate(bits)]  # position within the group

    def split_ties() -> jax.Array:
        return _bisect(lambda i: counts(lambda j, b: (b == t[group[j]]) & (index[j] <= i[group[j]])), need,
                       jnp.zeros(n_groups, jnp.int32), jnp.asarray(total, jnp.int32) - 1)
    last = jax.lax.cond(jnp.any((need > 0) & (need < tied)), split_ties,
                        lambda: jnp.asarray(total, jnp.int32) - 1)  # all tied entries go
    return [~((b < t[g]) | ((b == t[g]) & (index[j] <= last[g]) & (need[g] > 0)))
            for j, (b, g) in enumerate(zip(bits, group))]


def exact_mask(w: jax.Array, k: jax.Array) -> jax.Array:
    """True where kept: the k smallest |w| (ties by flat index) are pruned, exactly k of them."""
    return _select([_bits(w)], [0], jnp.reshape(k, (1,)))[0]


def n_of_m_mask(w: jax.Array, n: int, m: int, axis: int = 0) -> jax.Array:
    """True where kept: the n largest |w| of each group of m consecutive entries along `axis`."""
    axis %= w.ndim
    if w.shape[axis] % m:
        raise ValueError(f"dim {axis} of size {w.shape[axis]} is not divisible by M={m}")
    # groups split `axis` in place (no transpose): a stacked tensor's groups run along dim 1, and moving a
    # sharded dim to the front made GSPMD all-gather it inside the mask's cond, which deadlocked XLA's
    # CPU collectives on a (1, 4, 2) mesh
    g = jnp.abs(w.astype(jnp.float32)).reshape(w.shape[:axis] + (w.shape[axis] // m, m) + w.shape[axis + 1:])
    pos = jax.lax.broadcasted_iota(jnp.int32, g.shape, axis + 1)
    ahead = jnp.zeros(g.shape, jnp.int32)  # entries of the group ranked before this one
    for j in range(m):
        other = jnp.take(g, j, axis=axis + 1)[(slice(None),) * (axis + 1) + (None,)]
        ahead += ((other > g) | ((other == g) & (j < pos))).astype(jnp.int32)
    return (ahead < n).reshape(w.shape)


def sparsity_of(masks: Any) -> jax.Array:
    """Fraction of pruned entries over all pruned (full-shaped) masks."""
    full = [m for m in jax.tree.leaves(masks) if m.ndim]
    return sum(jnp.sum(~m, dtype=jnp.float32) for m in full) / max(sum(m.size for m in full), 1)


def layer_sparsity(masks: Any) -> dict[str, jax.Array]:
    """'sparsity/<path>' -> fraction pruned, for each pruned (full-shaped) mask."""
    flat, _ = jax.tree_util.tree_flatten_with_path(masks)
    return {f"sparsity/{path_str(p)}": jnp.mean(~m, dtype=jnp.float32) for p, m in flat if m.ndim}


def sparsity_metrics(state: PruneState) -> dict[str, jax.Array]:
    """'sparsity' overall and 'sparsity/<path>' per pruned tensor, from the zeros counted when the
    masks were last computed (no per-step pass over the masks)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state.masks)
    full = [(path_str(p), m.size) for p, m in flat if m.ndim]
    out = {"sparsity": jnp.sum(state.pruned).astype(jnp.float32) / max(sum(n for _, n in full), 1)}
    fractions = state.pruned.astype(jnp.float32) / jnp.asarray([float(n) for _, n in full] or [1.0])
    out.update({f"sparsity/{name}": fractions[i] for i, (name, _) in enumerate(full)})
    return out


class PruneState(NamedTuple):
    """The inner optimizer's state, one mask per parameter (scalar True where not pruned), the
    step, and the pruned count of each full-shaped mask (in leaf order, counted when computed)."""

    inner: Any
    masks: Any
    count: jax.Array
    pruned: jax.Array


def find_prune_state(opt_state: Any) -> PruneState | None:
    """The PruneState anywhere inside an optimizer state (prune may sit inside an optax.chain), or None."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
             if isinstance(x, PruneState)]
    return found[0] if found else None


def prune(inner: optax.GradientTransformation, sparsity: Callable[[jax.Array], jax.Array], *,
          update_every: int = 1, start: int = 0, end: int = 0, nm: tuple[int, int] | None = None,
          scope: str = "layer", include: Include = default_include, erk: float | None = None,
          criterion: str = "magnitude", nm_axis: Callable[[tuple[Any, ...], jax.Array], int] = lambda p, x: 0,
          layers: Callable[[tuple[Any, ...], jax.Array], int] = lambda p, x: 0) -> optax.GradientTransformation:
    """Wrap `inner` with magnitude pruning; masks recomputed when start <= step <= end and
    (step - start) % update_every == 0, and at `end` (N:M masks once, at `start`). `step` counts
    the updates done before this one. erk=S: per-tensor targets from the ERK distribution for a
    total sparsity S, each tensor following `sparsity(step) / S` of its own target (scope layer).
    criterion="random" ranks by fixed random scores instead of |w| (the baseline magnitude must beat).
    nm_axis(path, param) names the dimension N:M groups run along (the input features); layers(path,
    param) how many leading dims index stacked layers: each layer is thresholded as its own tensor."""

    def scores(leaves: list[jax.Array]) -> list[jax.Array]:
        if criterion == "magnitude":
            return leaves
        # one fixed key per tensor: the ranking never changes, so successive masks are nested
        return [jax.random.uniform(jax.random.fold_in(jax.random.key(0), i), x.shape) for i, x in enumerate(leaves)]

    def init(params: Any) -> PruneState:
        masks = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.ones(x.shape, bool) if include(p, x) else jnp.ones((), bool), params)
        n_full = sum(m.ndim > 0 for m in jax.tree.leaves(masks))
        return PruneState(inner.init(params), masks, jnp.zeros((), jnp.int32), jnp.zeros(n_full, jnp.int32))

    def compute(params: Any, masks: Any, step: jax.Array) -> tuple[Any, jax.Array]:
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        chosen = [include(p, x) for p, x in flat]
        leaves = scores([x for _, x in flat])
        old = jax.tree.leaves(masks)
        if nm is not None:
            out = [n_of_m_mask(x, *nm, nm_axis(p, x)) if c else o
                   for (p, _), x, c, o in zip(flat, leaves, chosen, old)]
        elif not any(chosen):
            out = old
        else:
            # a stacked tensor's layers are tensors of their own (its leading dims index them)
            lead = [layers(p, x) for (p, _), c, x in zip(flat, chosen, leaves) if c]
            stacks = [x for x, c in zip(leaves, chosen) if c]
            xs = [part for x, n in zip(stacks, lead)
                  for part in (list(x.reshape((-1,) + x.shape[n:])) if n else [x])]
            s = sparsity(step)
            if scope == "layer":  # one threshold per tensor; ERK scales each target by a static factor
                scale = [t / erk for t in erk_sparsities([x.shape for x in xs], erk)] if erk else [1.0] * len(xs)
                k = jnp.stack([jnp.round(s * f * x.size) for x, f in zip(xs, scale)])
                group = list(range(len(xs)))
            else:  # one threshold across all chosen tensors
                k, group = jnp.round(s * sum(x.size for x in xs))[None], [0] * len(xs)
            kept = iter(_select([_bits(x) for x in xs], group, k))
            whole = iter([jnp.stack([next(kept) for _ in range(math.prod(x.shape[:n]))]).reshape(x.shape) if n
                          else next(kept) for x, n in zip(stacks, lead)])
            out = [next(whole) if c else o for c, o in zip(chosen, old)]
        pruned = jnp.asarray([jnp.sum(~m, dtype=jnp.int32) for m in out if m.ndim], jnp.int32)
        return jax.tree_util.tree_unflatten(treedef, out), jnp.reshape(pruned, (-1,))

    def update(updates: Any, state: PruneState, params: Any = None) -> tuple[Any, PruneState]:
        if params is None:
            raise ValueError("prune needs params: call update(updates, state, params)")
        step = state.count
        due = (step >= start) & (step <= max(end, start)) & \
            (((step - start) % update_every == 0) | (step == end))  # the last update lands on `end`
        if nm is not None:
            due = step == start
        masks, pruned = jax.lax.cond(due, lambda: compute(params, state.masks, step),
                                     lambda: (state.masks, state.pruned))
        # Pruned coordinates get no gradient and enter the inner update with zero moments, so momentum
        # cannot revive them and the moments stay zero there. These selects are elementwise producers
        # of the optimizer's own loops: XLA fuses them, and a step between mask updates costs no extra pass.
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0).astype(g.dtype), updates, masks)
        inner_in = optax.tree_map_params(
            inner, lambda leaf, m: jnp.where(m, leaf, 0).astype(leaf.dtype) if leaf.shape == m.shape or
            m.ndim == 0 else leaf, state.inner, masks)
        updates, inner_state = inner.update(grads, inner_in, params)
        # parameters end the step exactly zero where pruned, whatever the inner optimizer does
        updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p).astype(u.dtype), updates, params, masks)
        return updates, PruneState(inner_state, masks, step + 1, pruned)

    return optax.GradientTransformation(init, update)


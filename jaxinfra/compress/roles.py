"""What each parameter does in the forward pass, and so which ones pruning takes by default.

Names lie (a 10-class output layer called `linear2`, a position table called `pos_embed/embedding`),
so roles are read from the traced loss instead: a parameter that reaches the weight operand of a
matmul or convolution (through casts, reshapes and transposes only) is a *kernel*, and the
dimension it contracts with the input's features is its input-feature dimension (where N:M groups
run: dim 0 of a Linear `(in, out)`, the input channels of a Conv `(..., in, out)`); one that is
looked up (a gather) is an *embedding*, even when it also serves as a tied output projection; the
kernel of the last matmul in the forward pass is the *output layer*. The default selection is
every 2-D+ kernel but the output layer: never embeddings, position tables, biases or norm scales,
whatever the model calls them. This covers nnx.Linear, LinearGeneral, Einsum and Conv and models
that hold raw Params (ours, nanodo's) alike.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.extend  # noqa: F401  (jax.extend.core.Literal: not imported by `import jax`)
from jax.sharding import PartitionSpec as P

from jaxinfra.core.errors import UserError
from jaxinfra.core.names import layer_names, lead_of, path_str

if TYPE_CHECKING:
    from jaxinfra.settings.compression import PruneConfig

Dims = tuple[tuple[int, ...], ...]  # per dimension of a value: the parameter dimensions it came from
# Primitives that only move or cast a parameter's entries: its role survives them.
_SAME = {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint", "device_put",
         "mesh_cast", "optimization_barrier"}


class Role(NamedTuple):
    """One parameter's use: kind (kernel, embedding or other), the input-feature dimension of a
    kernel, the position of its last matmul in the forward pass (-1: none), and every dimension its
    first matmul contracts (an attention output kernel (H, K, D) contracts two; int8 scales are per
    everything else)."""

    kind: str
    in_dim: int | None
    order: int
    in_dims: tuple[int, ...] = ()


def _reshape_dims(dims: Dims, old: Sequence[int], new: Sequence[int]) -> Dims:
    """The origin of each dimension after a row-major reshape: merged dimensions pool their origins."""
    out: list[tuple[int, ...]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        gi, gj = [i], [j]  # grow the smaller side until both cover the same number of elements
        a, b = (old[i] if i < len(old) else 1), (new[j] if j < len(new) else 1)
        i, j = i + 1, j + 1
        while a != b:
            if a < b and i < len(old):
                a *= old[i]; gi.append(i); i += 1
            elif j < len(new):
                b *= new[j]; gj.append(j); j += 1
            else:
                break
        origin = tuple(o for k in gi if k < len(old) for o in dims[k])
        out.extend(origin for k in gj if k < len(new))
    return tuple(out[:len(new)])


class _Trace:
    """Walks a jaxpr (and the jaxprs inside it) following each parameter through shape-only ops."""

    def __init__(self) -> None:
        self.kind: dict[int, str] = {}
        self.in_dim: dict[int, int] = {}
        self.in_dims: dict[int, tuple[int, ...]] = {}
        self.order: dict[int, int] = {}
        self.count = 0

    def _kernel(self, leaf: int, dims: Dims, contracting: Sequence[int]) -> None:
        self.count += 1
        self.order[leaf] = self.count
        if self.kind.get(leaf) != "embedding":
            self.kind[leaf] = "kernel"
        origin = [o for d in contracting for o in dims[d]]
        if origin:  # features run fastest along the minor-most contracted dimension
            self.in_dim.setdefault(leaf, origin[-1])
            self.in_dims.setdefault(leaf, tuple(sorted(set(origin))))

    def walk(self, jaxpr: Any, env: dict[Any, tuple[int, Dims]]) -> list[tuple[int, Dims] | None]:
        """Record the roles found in `jaxpr`; env maps its tracked invars; returns its outvars' tracks."""
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            ins = [env.get(v) if not isinstance(v, jax.extend.core.Literal) else None for v in eqn.invars]
            if not any(ins):
                continue
            first = ins[0]
            outs: list[tuple[int, Dims] | None] = [None] * len(eqn.outvars)
            if name in _SAME and first is not None:
                outs = [ins[k] for k in range(len(eqn.outvars))]
            elif name == "transpose" and first is not None:
                outs[0] = (first[0], tuple(first[1][p] for p in eqn.params["permutation"]))
            elif name == "reshape" and first is not None:
                outs[0] = (first[0], _reshape_dims(first[1], eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape))
            elif name == "squeeze" and first is not None:
                drop = {d % len(first[1]) for d in eqn.params["dimensions"]}
                outs[0] = (first[0], tuple(d for k, d in enumerate(first[1]) if k not in drop))
            elif name == "broadcast_in_dim" and first is not None:
                dims: list[tuple[int, ...]] = [()] * len(eqn.outvars[0].aval.shape)
                for k, d in enumerate(eqn.params["broadcast_dimensions"]):
                    dims[d] = first[1][k]
                outs[0] = (first[0], tuple(dims))
            elif name in ("slice", "dynamic_slice") and first is not None:
                outs[0] = first  # a window of the tensor (w[i] of stacked layers squeezes its size-1 dim next)
            elif name == "split" and first is not None:
                outs = [first] * len(eqn.outvars)  # a fused QKV kernel split before its matmuls
            elif name == "dot_general":
                (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
                for track, contracting in zip(ins[:2], (lhs_c, rhs_c)):
                    if track is not None:
                        self._kernel(track[0], track[1], contracting)
            elif name == "conv_general_dilated" and len(ins) > 1 and ins[1] is not None:
                rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
                self._kernel(ins[1][0], ins[1][1], [rhs_spec[1]])
            elif name == "gather" and first is not None:
                self.kind[first[0]] = "embedding"  # looked up by index: a table, not a weight
            else:
                outs = self._nested(eqn, ins)
            for v, track in zip(eqn.outvars, outs):
                if track is not None:
                    env[v] = track
        return [env.get(v) if not isinstance(v, jax.extend.core.Literal) else None for v in jaxpr.outvars]

    def _nested(self, eqn: Any, ins: list) -> list:
        """Follow tracked operands into a jit, remat, custom-derivative, cond or scan body."""
        outs: list = [None] * len(eqn.outvars)
        for key, sub in eqn.params.items():
            for one in sub if isinstance(sub, (tuple, list)) else (sub,):
                inner = getattr(one, "jaxpr", one)
                if not hasattr(inner, "eqns"):
                    continue
                args = ins[1:] if eqn.primitive.name == "cond" else ins
                if eqn.primitive.name == "scan":  # xs lose their leading (scanned) dimension
                    n = eqn.params["num_consts"] + eqn.params["num_carry"]
                    args = args[:n] + [(t[0], t[1][1:]) if t is not None else None for t in args[n:]]
                if len(inner.invars) != len(args):
                    continue
                found = self.walk(inner, {v: t for v, t in zip(inner.invars, args) if t is not None})
                if len(found) == len(outs) and eqn.primitive.name not in ("scan", "while"):
                    outs = [o or f for o, f in zip(outs, found)]
        return outs


def find_roles(forward: Callable[..., Any], params: Any, *args: Any) -> dict[str, Role]:
    """Each parameter's role in forward(params, *args) (traced abstractly): path -> Role."""
    jaxpr = jax.make_jaxpr(forward)(params, *args).jaxpr
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    trace = _Trace()
    trace.walk(jaxpr, {v: (i, tuple((d,) for d in range(len(x.shape))))
                       for i, (v, (_, x)) in enumerate(zip(jaxpr.invars, flat))})
    return {path_str(p): Role(trace.kind.get(i, "other"), trace.in_dim.get(i), trace.order.get(i, -1),
                              trace.in_dims.get(i, ()))
            for i, (p, _) in enumerate(flat)}


def output_layer(roles: Mapping[str, Role]) -> str | None:
    """The kernel of the forward pass's last matmul (None if that is an embedding: tied weights)."""
    last = max(roles.items(), key=lambda kv: kv[1].order, default=None)
    return last[0] if last is not None and last[1].order > 0 and last[1].kind == "kernel" else None


def _axis_names(spec: Any) -> set[str]:
    """Logical axis names of one PartitionSpec (entries may be tuples of names)."""
    out: set[str] = set()
    for entry in tuple(spec) if spec is not None else ():
        out.update(entry if isinstance(entry, tuple) else (entry,) if entry else ())
    return out


def _matches(pattern: str, path: str, names: set[str], ndim: int) -> bool:
    """A glob or a logical axis name; a 1-D tensor only when named exactly."""
    if ndim < 2:
        return pattern == path
    return fnmatch.fnmatchcase(path, pattern) or pattern in names


@dataclass(frozen=True)
class Selection:
    """The tensors pruning takes (path -> their input-feature dimension) and, for every other
    parameter, why not."""

    chosen: dict[str, int]
    skipped: dict[str, str]
    lead: dict[str, int] = field(default_factory=dict)  # a stacked tensor's leading layer dims (pruned per layer)

    def include(self, path: tuple[Any, ...], leaf: Any) -> bool:
        """prune()'s `include`: whether this parameter is pruned."""
        return path_str(path) in self.chosen

    def axis(self, path: tuple[Any, ...], leaf: Any) -> int:
        """prune()'s `nm_axis`: the dimension N:M groups run along."""
        return self.chosen.get(path_str(path), 0)

    def layers(self, path: tuple[Any, ...], leaf: Any) -> int:
        """prune()'s `layers`: how many leading dims index stacked layers (each layer pruned as a tensor)."""
        return self.lead.get(path_str(path), 0)


def _glob(pattern: str, path: str, layers: list[str] | None, key: str) -> bool:
    """Whether a path glob takes a tensor; a stacked one's layers ('blocks/0/attn/wq', ...) must all
    match or none (a glob written for a list of blocks keeps working)."""
    if layers is None:
        return fnmatch.fnmatchcase(path, pattern)
    hits = [fnmatch.fnmatchcase(name, pattern) for name in layers]
    if any(hits) and not all(hits):
        raise UserError(f"{key} {pattern!r} takes some layers of the stacked {path} ({sum(hits)} of {len(hits)}): "
                        f"stacked layers are selected alike, name them all (e.g. {path.split('/')[0]}/*/...)")
    return all(hits) or fnmatch.fnmatchcase(path, pattern)


def select(abstract: Any, logical: Any, roles: Mapping[str, Role], params: Sequence[str] = (),
           exclude: Sequence[str] = (), key: str = "prune", output_layer_too: bool = False,
           stacked: Mapping[str, Any] | None = None) -> Selection:
    """By default every 2-D+ kernel but the output layer (or with it); `params` (globs or logical axis
    names) selects instead, `exclude` (globs) removes. A pattern that matches nothing is a UserError
    naming `key`.params or `key`.exclude. A Stacked module's tensor (`stacked`) counts as its layers."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    specs = {path_str(p): _axis_names(s) for p, s in
             jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, P))[0]}
    out_layer = output_layer(roles)
    chosen: dict[str, int] = {}
    skipped: dict[str, str] = {}
    used: set[str] = set()
    lead: dict[str, int] = {}
    for p, x in flat:
        path, role = path_str(p), roles.get(path_str(p), Role("other", None, -1))
        layers = layer_names(path, tuple(x.shape), stacked or {})
        if layers is not None:
            lead[path] = lead_of(path, tuple(x.shape), stacked or {})
        ndim = len(x.shape) - lead.get(path, 0)  # a layer's
        hit = [pat for pat in params if _matches(pat, path, specs.get(path, set()), ndim)
               or (layers is not None and ndim >= 2 and _glob(pat, path, layers, f"{key}.params"))]
        gone = [pat for pat in exclude if _glob(pat, path, layers, f"{key}.exclude")]
        used.update(hit + gone)
        if gone:
            skipped[path] = f"{key}.exclude {gone[0]!r}"
        elif params and not hit:
            skipped[path] = f"not in {key}.params"
        elif params:
            chosen[path] = role.in_dim if role.in_dim is not None else 0
        elif ndim < 2:
            skipped[path] = "1-D (bias, norm scale)"
        elif role.kind == "embedding":
            skipped[path] = "embedding (looked up)"
        elif path == out_layer and not output_layer_too:
            skipped[path] = "output layer"
        elif role.kind != "kernel":
            skipped[path] = "not a matmul or conv weight (added or scaled: position tables, 2-D biases)"
        else:
            chosen[path] = role.in_dim if role.in_dim is not None else 0
    for name, patterns in ((f"{key}.params", params), (f"{key}.exclude", exclude)):
        missing = [pat for pat in patterns if pat not in used]
        if missing:
            raise UserError(f"{name}: {', '.join(map(repr, missing))} matches no parameter (give path globs such "
                            f"as 'blocks/*/mlp/*'{' or logical axis names' if name.endswith('.params') else ''}; "
                            f"a 1-D tensor only by its full path)")
    if not chosen:
        raise UserError(f"{key}: no parameter is selected (the model has no 2-D+ matmul or conv weight besides its "
                        f"output layer): name tensors with {key}.params")
    return Selection(chosen, skipped, {k: v for k, v in lead.items() if k in chosen})


def selection_report(selection: Selection, abstract: Any, targets: Mapping[str, str]) -> list[str]:
    """The start-up table: each pruned tensor (shape, target), then what is left out and why."""
    shapes = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    rows = [f"{'tensor':32s} {'shape':>16s}  target"]
    layers: dict[tuple[str, str, str], int] = {}  # blocks/3/attn/wq -> blocks/*/attn/wq: layers share a row
    for path in selection.chosen:
        key = ("/".join("*" if part.isdigit() else part for part in path.split("/")),
               "x".join(map(str, shapes[path])), targets[path])
        layers[key] = layers.get(key, 0) + 1
    rows += [f"{path:32s} {shape:>16s}  {target}" + (f"  (x{n})" if n > 1 else "")
             for (path, shape, target), n in layers.items()]
    why: dict[str, list[str]] = {}
    for path, reason in selection.skipped.items():
        layer = "/".join("*" if part.isdigit() else part for part in path.split("/"))
        if layer not in why.setdefault(reason, []):
            why[reason].append(layer)
    for reason, paths in why.items():
        shown = ", ".join(paths[:6]) + (f" and {len(paths) - 6} more" if len(paths) > 6 else "")
        rows.append(f"not pruned, {reason}: {shown}")
    total = sum(math.prod(shapes[p]) for p in selection.chosen)
    rows.append(f"{len(selection.chosen)} tensors, {total:,} weights pruned")
    return rows


def check_nm(p: PruneConfig, abstract: Any, selection: Selection | None) -> None:
    """N:M groups run along each pruned kernel's input-feature dimension: it, and each device's shard
    of it (`abstract` carries the shardings), must divide by M."""
    nm = p.nm
    if nm is None or selection is None:
        return
    for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = path_str(path)
        if name in selection.chosen:
            axis = selection.chosen[name]
            size, local = a.shape[axis], a.sharding.shard_shape(a.shape)[axis]
            if size % nm[1] or local % nm[1]:
                raise UserError(f"prune.pattern={p.pattern}: parameter {name} ({'x'.join(map(str, a.shape))}) "
                                f"groups along dim {axis}, the input features its matmul or conv contracts, of size "
                                f"{size} ({local} per device), not divisible by M={nm[1]}; leave it dense with "
                                f"prune.exclude=['{name}']")

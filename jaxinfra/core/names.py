"""Every tensor name in one place: a parameter's path ('blocks/0/attn/wq' in messages and reports,
'blocks.0.attn.wq' as a tensor name in exports and inspection: the safetensors convention), and the
per-layer names of a stacked tensor (`Stacked`'s (L, ...) parameters read as one tensor per layer)."""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple

import numpy as np


def path_str(path: tuple[Any, ...], sep: str = "/") -> str:
    """A pytree key path as 'blocks/0/attn/wq' (or with another separator)."""
    return sep.join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tensor_name(path: tuple[Any, ...]) -> str:
    """('blocks', 0, 'attn', 'wq') -> 'blocks.0.attn.wq'."""
    return path_str(path, ".")


def _match(path: str, shape: tuple[int, ...] | None, stacked: Mapping[str, Any], sep: str
           ) -> tuple[int, tuple[int, ...]] | None:
    """(where the Stacked module's path ends in `path`, its leading layer dims) for a tensor of a
    Stacked module whose leading dims are those (any shape when None), else None."""
    for prefix, lead in stacked.items():
        at = _find(path, prefix.replace("/", sep), sep)
        if at >= 0 and (shape is None or tuple(shape[:len(lead)]) == tuple(lead)):
            return at, tuple(lead)
    return None


def layer_names(path: str, shape: tuple[int, ...] | None, stacked: Mapping[str, Any], sep: str = "/"
                ) -> list[str] | None:
    """A stacked tensor's per-layer names ('blocks/attn/wq' -> ['blocks/0/attn/wq', ...], in layer
    order), or None for a tensor of no Stacked module; `stacked` as `stacked_modules` gives it."""
    found = _match(path, shape, stacked, sep)
    if found is None:
        return None
    at, lead = found
    return [f"{path[:at]}{i}{sep}{path[at:]}" for i in range(int(np.prod(lead)))]


def find_stacked(name: str, shape: tuple[int, ...], names: Any, sep: str = ".") -> dict[str, tuple[int, ...]]:
    """A model's stacked tensor found as one tensor per layer among `names` (a file saved from a list of
    blocks, read without a record of the stacking): {module path: leading dims}, or {} if it is not."""
    parts = name.split(sep)
    for i in range(1, len(parts)):
        at = lambda k: sep.join(parts[:i] + [str(k)] + parts[i:])
        n = 0
        while at(n) in names:
            n += 1
        for lead in (tuple(shape[:1]), tuple(shape[:2])):
            if n and math.prod(lead) == n:
                return {"/".join(parts[:i]): lead}
    return {}


def lead_of(path: str, shape: tuple[int, ...] | None, stacked: Mapping[str, Any], sep: str = "/") -> int:
    """How many leading dims of a tensor index stacked layers (0 for a tensor of no Stacked module)."""
    found = _match(path, shape, stacked, sep)
    return len(found[1]) if found else 0


def _find(path: str, prefix: str, sep: str) -> int:
    """Where the module path `prefix` ends within `path` (at its start or after a separator: an
    optimizer's moments hold the parameters' paths deeper down), -1 if nowhere."""
    if path.startswith(prefix + sep):
        return len(prefix) + 1
    at = path.find(sep + prefix + sep)
    return at + len(prefix) + 2 if at >= 0 else -1


class Layer(NamedTuple):
    """Where a whole-layer tensor lives in the stored (maybe stacked) one."""

    stored: str  # the stored tensor's name
    index: int | None  # its layer, None for a tensor of no Stacked module
    lead: int  # how many leading dims the layer index spans (0, 1 or 2 for a circular schedule)
    shape: tuple[int, ...]  # the whole layer's shape


def whole_layers(shapes: Mapping[str, tuple[int, ...]], stacked: Mapping[str, Any], sep: str = "/"
                 ) -> dict[str, Layer]:
    """Stored tensor name -> shape, as users see tensors (exports, init_from, the HF folder): one
    entry per layer of each stacked tensor, named as a list of blocks would name it."""
    out = {}
    for name, shape in shapes.items():
        names, lead = layer_names(name, shape, stacked, sep), lead_of(name, shape, stacked, sep)
        if names is None:
            out[name] = Layer(name, None, 0, tuple(shape))
            continue
        out.update({n: Layer(name, i, lead, tuple(shape[lead:])) for i, n in enumerate(names)})
    return out


def take(x: Any, layer: Layer) -> Any:
    """One layer of a stored tensor (the tensor itself when it is not stacked)."""
    return x if layer.index is None else x.reshape((-1,) + tuple(x.shape[layer.lead:]))[layer.index]

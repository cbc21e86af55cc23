"""The one spelling of a parameter's path: 'blocks/0/attn/wq' in messages and reports,
'blocks.0.attn.wq' as a tensor name in exports and inspection (the safetensors convention)."""
from __future__ import annotations

from typing import Any


def path_str(path: tuple[Any, ...], sep: str = "/") -> str:
    """A pytree key path as 'blocks/0/attn/wq' (or with another separator)."""
    return sep.join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tensor_name(path: tuple[Any, ...]) -> str:
    """('blocks', 0, 'attn', 'wq') -> 'blocks.0.attn.wq'."""
    return path_str(path, ".")

"""What a checkpoint holds, read from its metadata alone."""
from __future__ import annotations

import math

import jax
import numpy as np

from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core import storage
from jaxinfra.core.names import tensor_name


def _sharding(meta: object) -> str:
    sh = getattr(meta, "sharding", None)
    spec = getattr(sh, "partition_spec", None)
    if spec is not None:
        return f"{tuple(spec)} on mesh {dict(zip(sh.axis_names, np.asarray(sh.shape).tolist()))}"
    return type(sh).__name__.replace("Metadata", "") if sh is not None else "-"


def describe_checkpoint(directory: str, step: int | None = None, verify: bool = False) -> list[str]:
    """Lines: the complete steps, then a row per tensor of one step (shape, dtype, saved sharding, bytes);
    with `verify`, every parameter is read and checked against the digest recorded at save."""
    step_dir, step = ckpt_reader.locate(directory, step)
    root = storage.dirname(step_dir)
    tree = ckpt_reader.state_metadata(step_dir)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    rows = [("tensor", "shape", "dtype", "saved sharding", "bytes")]
    total = 0
    for path, m in flat:
        n = math.prod(m.shape) * np.dtype(m.dtype).itemsize
        total += n
        rows.append((tensor_name(path), "x".join(map(str, m.shape)) or "()", str(m.dtype), _sharding(m), f"{n:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [f"{root}: steps {', '.join(map(str, ckpt_reader.complete_steps(root)))}",
             f"step {step}: {len(flat)} tensors, {total:,} bytes"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if verify:
        saved = ckpt_reader.SavedParams(step_dir)
        if saved.digests is None:
            lines.append(f"step {step} records no digests (written before they existed): nothing to verify")
        else:
            for _ in saved:  # each read checks its digest; a mismatch raises UserError naming the tensor
                pass
            lines.append(f"verified: the {len(saved.entries)} model tensors match the digests recorded at save")
    return lines

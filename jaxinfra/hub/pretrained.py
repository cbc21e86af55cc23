"""`from_pretrained`: a Hugging Face folder (llama, mistral, qwen2, qwen3; local, s3:// or gs://) as the default
Transformer born sharded on a mesh, each parameter read straight into its shardings: every distinct device slice
is read from the safetensors file alone (a memory-mapped slice) and put on the devices that hold it, so a process
reads only the bytes its devices hold and host memory above the parameters stays about one slice; plus the
folder's `tokenizer.json` as a `tokenizers.Tokenizer`."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from safetensors import safe_open

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import find_stacked, tensor_name, whole_layers
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.hub import families, hf
from jaxinfra.models.factory import fit_kv_heads, model_fn
from jaxinfra.models.transformer import Transformer
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.model import ModelConfig
from jaxinfra.settings.sections import Config


def folder_config(path: str, dtype: str | None = None, seq_len: int | None = None) -> Config:
    """The Config of a folder's model (model.* from its config.json; dtype the compute and parameter dtype,
    float32 by default; seq_len its max_position_embeddings unless given)."""
    fields = families.model_fields(path)
    seq_len = seq_len or int(families.read_config(path).get("max_position_embeddings") or 2048)
    dt = jnp.dtype(dtype or "float32").name
    model = ModelConfig(**fields, seq_len=seq_len, dtype=dt, param_dtype=dt)
    model.check()
    return Config(model=model)


def tokenizer_of(path: str) -> tokenizers.Tokenizer:
    """The folder's tokenizer.json (never a Python tokenizer class); UserError with a hint when it has none."""
    families.tokenizer_file(path)
    return tok_lib.load(path).impl


@contextlib.contextmanager
def _local(path: str) -> Iterator[str]:
    """The folder itself, or (s3://, gs://) a temporary copy of its weight files and index."""
    if not storage.is_remote(path):
        yield path
        return
    storage.reachable(path, "from_pretrained")
    with tempfile.TemporaryDirectory(prefix="jaxinfra-hf-") as tmp:
        for name in storage.listdir(path):
            if name.endswith((".safetensors", ".json")):
                storage.download(storage.join(path, name), os.path.join(tmp, name))
        yield tmp


class _Files:
    """HF tensor name -> its safetensors file, opened when first read (a slice is read from the mapped file) and
    closed by `release`: after each parameter, so the mapped pages a process holds stay one parameter's."""

    def __init__(self, folder: str, tied: bool):
        weights = hf.weights_file(folder)
        if weights.endswith(".index.json"):
            self.where = {k: os.path.join(folder, v) for k, v in
                          json.loads(storage.read_text(weights))["weight_map"].items()}
        else:
            self.where = {}
        self.stack = contextlib.ExitStack()
        self.open: dict[str, Any] = {}
        if not self.where:
            f = self._file(weights)
            self.where = {k: weights for k in f.keys()}
        # our names of the tensors there (int8 scales and a tied model's lm_head copy are no tensors of ours)
        skip = {"lm_head.weight"} if tied else set()
        found = (hf.our_name(n) for n in self.where if not n.endswith("_scale") and n not in skip)
        self.ours = {f[0] for f in found if f}

    def release(self) -> None:
        """Close every open file (their mappings go, and with them the file pages counted in resident memory)."""
        self.stack.close()
        self.stack, self.open = contextlib.ExitStack(), {}

    def _file(self, path: str) -> Any:
        if path not in self.open:
            try:
                self.open[path] = self.stack.enter_context(safe_open(path, framework="numpy"))
            except Exception as e:  # safetensors' own error types for a bad header
                raise UserError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:200]})") from None
        return self.open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(self.where[name]).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """A slice of a tensor; an int8 Linear weight of a compressed-tensors export dequantized with its
        per-output-channel scales (name_scale, (out, 1)): the same products as export/int8.py's."""
        values = self._file(self.where[name]).get_slice(name)[index]
        scale = name + "_scale"
        if values.dtype != np.int8 or scale not in self.where:
            return values
        piece = self._file(self.where[scale]).get_slice(scale)
        rows = piece[(index[0] if piece.get_shape()[0] > 1 else slice(None), slice(None))]
        return values.astype(rows.dtype) * rows


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Slices with explicit start and stop (make_array_from_callback gives slice(None) for a whole dim)."""
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _leaf(files: _Files, name: str, a: jax.ShapeDtypeStruct, sharding: Any) -> jax.Array:
    """One parameter (maybe stacked layers) on its sharding, each device's slice read from the files."""
    layers = whole_layers({name: tuple(a.shape)}, find_stacked(name, tuple(a.shape), files.ours), sep=".")
    plan = []
    for part, layer in layers.items():
        found = hf.slice_reader(part)
        if found is None or found[0] not in files.where:
            raise UserError(f"from_pretrained: the folder has no tensor for {part} (shape {layer.shape})")
        want = tuple(hf.hf_name(part)[1](np.empty(layer.shape, np.uint8)).shape)
        if files.shape(found[0]) != want:
            raise UserError(f"from_pretrained: tensor {found[0]} has shape {files.shape(found[0])}, config.json "
                            f"says {want}")
        plan.append((found, layer))

    def read(index: tuple[slice, ...]) -> np.ndarray:
        ix = _bounds(index, a.shape)
        lead = plan[0][1].lead
        picked = [(f, layer) for f, layer in plan if layer.index is None or ix[0].start <= layer.index < ix[0].stop]
        part = lambda f, layer: f[1](lambda i, n=f[0]: files.read(n, i), ix[lead:], layer.shape)
        if lead == 0:
            return part(*picked[0]).astype(a.dtype, copy=False)
        out = np.empty((len(picked),) + tuple(s.stop - s.start for s in ix[lead:]), a.dtype)
        for i, (f, layer) in enumerate(picked):  # each layer copied once, into its place (np.stack: twice)
            out[i] = part(f, layer)
        return out

    # One slice at a time: read it once for every device that holds it (replicated KV heads, norms), put it on
    # those devices, let it go. make_array_from_callback would hold every device's host slice of the parameter
    # at once (+201 MB for a 1.2 GB folder's largest; 75 MB this way: benchmarks/hf_load.py).
    holders: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(a.shape).items():
        holders.setdefault(tuple((s.start, s.stop) for s in _bounds(index, a.shape)), []).append((device, index))
    shards = []
    for places in holders.values():
        host = read(places[0][1])
        shards += [jax.device_put(host, device) for device, _ in places]
        del host
    return jax.make_array_from_single_device_arrays(a.shape, sharding, shards)


def from_pretrained(path: str, *, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None
                    ) -> tuple[Transformer, tokenizers.Tokenizer]:
    """(model, tokenizer) of a Hugging Face folder: the model born sharded on `mesh` (default: every device on
    fsdp) under the default rules, computing and keeping `dtype` (default float32); `model(ids_BxT)` returns
    float32 logits (B, T, vocab). UserError names the first config field the model cannot honour."""
    cfg = folder_config(path, dtype)
    tokenizer = tokenizer_of(path)
    mesh = mesh or make_mesh(1, -1, 1)
    cfg = fit_kv_heads(cfg, mesh)
    shd.check_logical_sizes(cfg.model.logical_sizes(), cfg.mesh.logical_rules, mesh)
    build, static = model_fn(cfg, mesh), {}

    def abstract() -> Any:
        with nnx.use_eager_sharding(False):  # logical names stay names: the rules place them below
            graphdef, params = nnx.split(build(), nnx.Param)
        static["graphdef"], static["logical"] = graphdef, nnx.get_partition_spec(params)
        return params

    params = jax.eval_shape(abstract)
    shardings = shd.tree_shardings(nnx.to_pure_dict(static["logical"]), mesh, cfg.mesh.logical_rules)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))
    with _local(path) as local:
        files, arrays = _Files(local, cfg.model.tie_embeddings), []
        try:
            for (p, a), sh in zip(leaves, jax.tree.leaves(shardings)):
                arrays.append(_leaf(files, tensor_name(p), a, sh))
                files.release()
        finally:
            files.release()
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, arrays))
    return nnx.merge(static["graphdef"], params), tokenizer


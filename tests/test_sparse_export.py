"""Sparse export: bitwise round trips (unstructured and 2:4), the expected sizes, dense tensors untouched,
the header reserve, and bad input as one line with exit status 2."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfra import cli
from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core.errors import UserError
from jaxinfra.core.state import TrainState
from jaxinfra.export import sparse
from jaxinfra.export import writer as export_lib
from jaxinfra.export import sparse_writer
from jaxinfra.export import safetensors as safetensors_lib


def _pruned(seed=0):
    """Tensors as the trainer leaves them: an 80% unstructured kernel (with a -0.0 and a NaN kept), a 2:4
    kernel, a dense embedding and norm."""
    rng = np.random.default_rng(seed)
    w80 = rng.normal(size=(32, 64)).astype(np.float32)
    w80.reshape(-1)[np.argsort(np.abs(w80).reshape(-1), kind="stable")[:round(0.8 * w80.size)]] = 0
    kept = np.flatnonzero(w80)
    w80.reshape(-1)[kept[:2]] = [-0.0, np.nan]  # bit patterns that are not zero: they must come back as such
    w24 = rng.normal(size=(64, 4, 8)).astype(np.float32)
    g = w24.reshape(16, 4, 32)
    np.put_along_axis(g, np.argsort(np.abs(g), axis=1)[:, :2], 0, axis=1)
    return {"embed": rng.normal(size=(256, 32)).astype(np.float32),
            "blocks": {"0": {"attn": {"wq": w80}, "mlp": {"w_up": w24}}},
            "norm": {"scale": np.ones(32, np.float32)}}


def _save(directory, params, pattern="unstructured", step=7):
    ck = ckpt_lib.Checkpointer(str(directory))
    ck.save(step, TrainState(jnp.asarray(step), jax.tree.map(jnp.asarray, params), {}),
            {"step": step, "config": {"prune": {"pattern": pattern}}})
    ck.close()
    return str(directory)


def _bits(x):
    return x.view(f"u{x.dtype.itemsize}")


@pytest.fixture(scope="session")  # once per worker, even if xdist interleaves modules
def saved(tmp_path_factory):
    params = _pruned()
    return params, _save(tmp_path_factory.mktemp("sparse") / "checkpoints", params, pattern="2:4")


def test_round_trip_is_bitwise_and_sizes_are_as_expected(saved, tmp_path):
    params, directory = saved
    out = str(tmp_path / "sparse.safetensors")
    s = sparse_writer.export_sparse(directory, out)
    dense = export_lib.export(directory, str(tmp_path / "dense.safetensors"))[0]
    assert s.dense_bytes == os.path.getsize(dense)  # computed from the shapes, without writing it
    assert s.sparse_bytes == os.path.getsize(out)
    assert s.encodings == {"blocks.0.attn.wq": "bitmask", "blocks.0.mlp.w_up": "nm 2:4",
                           "embed": "dense", "norm.scale": "dense"}
    back, want = safetensors_lib.load(out), safetensors_lib.load(dense)
    assert back.keys() == want.keys()
    for k in want:
        assert back[k].dtype == want[k].dtype and back[k].shape == want[k].shape
        np.testing.assert_array_equal(_bits(back[k]), _bits(want[k]), err_msg=k)
    wq = params["blocks"]["0"]["attn"]["wq"]
    assert np.signbit(back["blocks.0.attn.wq"].reshape(-1)[np.flatnonzero(_bits(wq))[0]])  # -0.0 kept
    # what each tensor costs: 80%: 410 f32 values + a 2048-bit mask; 2:4: half the values + a uint8 index each
    nz80 = round(0.2 * 2048)
    data = nz80 * 4 + 2048 // 8 + 1024 * (4 + 1) + 256 * 32 * 4 + 32 * 4
    dense_data = (2048 + 2048 + 256 * 32 + 32) * 4
    header = s.sparse_bytes - data
    assert 8 < header < 2048 and s.dense_bytes - dense_data < 1024
    assert s.nonzeros == nz80 + 1024 + 256 * 32 + 32 - 1 and s.params == 2048 * 2 + 256 * 32 + 32  # -0.0 == 0
    with open(out, "rb") as f:  # the compressed pieces are really what is stored
        n = int.from_bytes(f.read(8), "little")
        head = json.loads(f.read(n))
    assert head["blocks.0.attn.wq.values"]["shape"] == [nz80] and head["blocks.0.attn.wq.mask"]["dtype"] == "U8"
    assert head["blocks.0.mlp.w_up.indices"]["shape"] == [1024] and head["embed"]["shape"] == [256, 32]
    info = json.loads(head["__metadata__"]["encoding.blocks.0.mlp.w_up"])
    assert info == {"encoding": "nm", "n": 2, "m": 4, "shape": [64, 4, 8], "dtype": "float32"}
    # summarize() (compare's numbers) gives the same sizes without writing anything
    step, tensors = ckpt_reader.iter_params(directory)
    again = sparse_writer.summarize(tensors, (2, 4), export_lib.base_metadata(step))
    assert (again.sparse_bytes, again.dense_bytes, again.nonzeros) == (s.sparse_bytes, s.dense_bytes, s.nonzeros)


def test_unstructured_checkpoint_detects_n_of_m_and_bf16(tmp_path):
    params = _pruned(1)
    directory = _save(tmp_path / "checkpoints", params)  # the meta names no pattern: 2:4 is detected
    out = str(tmp_path / "s.safetensors")
    s = sparse_writer.export_sparse(directory, out, dtype="bf16")
    assert s.encodings["blocks.0.mlp.w_up"] == "nm 2:4" and s.encodings["blocks.0.attn.wq"] == "bitmask"
    back = safetensors_lib.load(out)
    for name, w in (("blocks.0.attn.wq", params["blocks"]["0"]["attn"]["wq"]), ("embed", params["embed"])):
        want = w.astype(back[name].dtype)
        assert back[name].dtype.name == "bfloat16"
        np.testing.assert_array_equal(_bits(back[name]), _bits(want))


def test_encode_keeps_dense_what_would_not_shrink_and_pads_short_groups():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    w[0, :2] = 0  # 2 zeros of 64: values + bitmask (62 * 4 + 8 bytes) would not be smaller than 256 bytes
    assert sparse.encode("w", w)[1] is None
    g = w.reshape(2, 4, 8)
    w[0, :5] = 0  # 5 zeros: now a bitmask (59 * 4 + 8 bytes) is smaller
    assert sparse.encode("w", w)[1]["encoding"] == "bitmask"
    g[:, 1:] = 0  # at most 1 nonzero per group of 4: configured 2:4 still holds (short groups are padded)
    pieces, how = sparse.encode("w", w, (2, 4))
    assert how["encoding"] == "nm" and dict(pieces)["w.values"].size == 2 * 2 * 8
    np.testing.assert_array_equal(sparse.decode(how, dict((k[2:], v) for k, v in pieces).__getitem__), w)
    assert sparse.nm_of(sparse.nonzero(w), (2, 8)) == (2, 8, 0)  # (N, M, the axis groups run along)
    assert sparse.nm_of(sparse.nonzero(rng.normal(size=(8, 8))), (2, 4)) is None


def test_cli_sparse_prints_sizes_and_bad_input_exits_2(saved, tmp_path, capsys):
    _, directory = saved
    out = tmp_path / "m.safetensors"
    assert cli.export_main([directory, "--out", str(out), "--sparse"]) == 0
    line = capsys.readouterr().out
    assert f"({os.path.getsize(out):,} bytes; the dense file would be" in line and "2 of 4 tensors compressed" in line
    for argv, words in (([str(tmp_path / "missing"), "--out", str(out), "--sparse"], [str(tmp_path / "missing")]),
                        ([directory, "--out", str(out), "--sparse"], ["exists", "--force"]),
                        ([directory, "--out", str(out), "--sparse", "--force", "--max-shard-size", "1MB"],
                         ["--max-shard-size 1MB", "--sparse"])):
        assert cli.export_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err
    with pytest.raises(UserError, match="no such safetensors file"):
        safetensors_lib.load(str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.safetensors: not a safetensors file"):
        safetensors_lib.load(str(tmp_path / "bad.safetensors"))
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # a failed export leaves nothing


def test_reserved_header_bounds_the_real_one():
    # shapes whose dense entry has the longest shape text, and an all-nonzero tensor
    names = [("a", (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3), np.float32), ("b" * 60, (3,), np.uint8)]
    base = export_lib.base_metadata(12345678)
    tally = sparse_writer._Tally(base, None)
    for name, shape, dt in names:
        tally.add(name, np.ones(shape, dt))
    assert len(safetensors_lib.header(tally.stored, tally.meta)) <= sparse_writer._reserve(names, base)
    assert sparse_writer._reserve(names, base) % 8 == 0 and math.prod(names[0][1]) == 3


def test_n_of_m_along_conv_input_channels_round_trips_compactly():
    from jaxinfra.compress.pruning import n_of_m_mask
    from jaxinfra.export import sparse
    w = np.asarray(jax.random.normal(jax.random.key(3), (3, 3, 16, 8)), np.float32)
    w = np.where(np.asarray(n_of_m_mask(jnp.asarray(w), 2, 4, axis=2)), w, 0)  # 2:4 along in-channels
    for pattern in ((2, 4), None):  # configured, or detected
        pieces, how = sparse.encode("k", w, pattern)
        assert how["encoding"] == "nm" and how["axis"] == 2 and (how["n"], how["m"]) == (2, 4)
        stored = dict(pieces)
        sparse.check(how, lambda p: (stored[f"k.{p}"].shape, stored[f"k.{p}"].dtype) if f"k.{p}" in stored else None)
        assert stored["k.values"].size == w.size // 2
        np.testing.assert_array_equal(sparse.decode(how, lambda p: stored[f"k.{p}"]), w)
    with pytest.raises(ValueError, match="axis 4 is not a dimension"):
        sparse.check({**how, "axis": 4}, lambda p: (stored[f"k.{p}"].shape, stored[f"k.{p}"].dtype))

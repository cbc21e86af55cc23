"""Orbax checkpoints: restore onto other meshes, shape mismatches, corruption, export and reload."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core.errors import UserError
from jaxinfra.core.log import console
from jaxinfra.export import safetensors as safetensors_lib
from jaxinfra.export import writer as export_lib
from jaxinfra.parallel import sharding as shd
from steps import compile_step, make_batch, mesh_of, model_plan

# one xdist worker runs the whole module, so its module-scoped training runs happen once
pytestmark = pytest.mark.xdist_group("test_checkpoint")


def _plan(cfg, mesh):
    return model_plan(cfg, mesh)


def _train_and_save(cfg, directory, steps=3):
    """A few steps on (2,2,2), saved; returns (gathered state, the mesh's next-step loss)."""
    mesh = mesh_of((2, 2, 2))
    with jax.set_mesh(mesh):
        compiled, setup, batch_sh = compile_step(cfg, mesh)
        state = setup.state
        for i in range(steps):
            state, _ = compiled(state, {"tokens": jax.device_put(make_batch(cfg, i), batch_sh["tokens"])})
        ck = ckpt_lib.Checkpointer(directory)
        ck.save(steps, state, {"step": steps, ckpt_reader.STACKED: setup.plan.model.stacked})  # as train_model records
        ck.close()
        saved = shd.gather(state)
        _, metrics = compiled(state, {"tokens": jax.device_put(make_batch(cfg, steps), batch_sh["tokens"])})
        return saved, float(metrics["loss"])


@pytest.fixture(scope="session")  # once per worker, even if xdist interleaves modules
def saved(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    cfg = tiny_config()
    state, next_loss = _train_and_save(cfg, directory)
    return cfg, directory, state, next_loss


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 4, 1), (1, 1, 1)])
def test_restore_onto_another_mesh_and_continue(saved, shape):
    cfg, directory, state, next_loss = saved
    mesh = mesh_of(shape)
    with jax.set_mesh(mesh):
        plan = _plan(cfg, mesh)
        ck = ckpt_lib.Checkpointer(directory, read_only=True)
        restored = ckpt_lib.resume(ck, plan.abstract)
        assert int(restored.step) == 3
        for a, b in zip(jax.tree.leaves(shd.gather(restored)), jax.tree.leaves(state)):
            np.testing.assert_array_equal(a, b)
        leaf = restored.params["blocks"]["mlp"]["w_up"]
        assert leaf.sharding == plan.shardings.params["blocks"]["mlp"]["w_up"]
        assert len(leaf.sharding.device_set) == int(np.prod(shape))
        compiled, _, batch_sh = compile_step(cfg, mesh)
        new, metrics = compiled(restored, {"tokens": jax.device_put(make_batch(cfg, 3), batch_sh["tokens"])})
        assert int(new.step) == 4
        np.testing.assert_allclose(float(metrics["loss"]), next_loss, rtol=2e-6)


def test_other_model_shapes_name_the_first_mismatch(saved):
    cfg, directory, _, _ = saved
    mesh = mesh_of((2, 2, 2))
    with jax.set_mesh(mesh):
        plan = _plan(tiny_config("model.d_ff=128"), mesh)
        with pytest.raises(UserError, match=r"w_down has shape \(2, 64, 32\), the model expects \(2, 128, 32\)"):
            ckpt_lib.resume(ckpt_lib.Checkpointer(directory, read_only=True), plan.abstract)
        plan = _plan(tiny_config("model.n_layers=3"), mesh)
        with pytest.raises(UserError, match=r"blocks/attn/wk has shape \(2, 32, 4, 8\), the model expects \(3, 32"):
            ckpt_lib.resume(ckpt_lib.Checkpointer(directory, read_only=True), plan.abstract)


def test_missing_step_and_corrupt_files(saved, tmp_path, capsys):
    cfg, directory, state, _ = saved
    root = tmp_path / "checkpoints"
    shutil.copytree(directory, root)
    cfg5 = cfg
    mesh = mesh_of((2, 2, 2))
    with jax.set_mesh(mesh):
        plan = _plan(cfg5, mesh)
        ck = ckpt_lib.Checkpointer(str(root), read_only=True)
        with pytest.raises(UserError, match=r"checkpoint.restore_step=7 is not in .*\(steps: 3\)"):
            ckpt_lib.resume(ck, plan.abstract, restore_step=7)
        # a second, newer step, then truncate every data file of it
        shutil.copytree(root / "3", root / "5")
        meta = json.loads((root / "5" / "_CHECKPOINT_METADATA").read_text())
        (root / "5" / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
        for dirpath, _, files in os.walk(root / "5" / "state" / "d"):
            for f in files:
                with open(os.path.join(dirpath, f), "r+b") as fh:
                    fh.truncate(max(os.path.getsize(os.path.join(dirpath, f)) // 3, 1))
        ck = ckpt_lib.Checkpointer(str(root), read_only=True)
        assert ck.steps() == [3, 5]
        with pytest.raises(UserError, match=r"checkpoint step 5 is unreadable .*checkpoint.fallback=true"):
            ckpt_lib.resume(ck, plan.abstract)
        console(True)  # the run's console lines, as train_model shows them
        capsys.readouterr()
        restored = ckpt_lib.resume(ck, plan.abstract, fallback=True)
        said = capsys.readouterr().out.splitlines()
        assert int(restored.step) == 3 and "step 5" in said[0]


def test_export_streams_whole_tensors_and_reloads_on_one_device(saved, tmp_path):
    cfg, directory, state, _ = saved
    out = str(tmp_path / "model.safetensors")
    files = export_lib.export(directory, out)
    assert files == [out]
    with pytest.raises(UserError, match="exists; pass --force"):
        export_lib.export(directory, out)
    flat = safetensors_lib.load(out)
    assert flat["blocks.1.mlp.w_up"].shape == (32, 64)
    np.testing.assert_array_equal(flat["embed"], state.params["embed"])
    bf16 = safetensors_lib.load(export_lib.export(directory, str(tmp_path / "b.safetensors"), dtype="bf16")[0])
    assert bf16["head"].dtype.name == "bfloat16"
    parts = export_lib.export(directory, str(tmp_path / "s.safetensors"), max_shard_bytes=20_000)
    assert parts[-1].endswith(".index.json") and len(parts) > 3
    merged = safetensors_lib.load(parts[-1])
    assert merged.keys() == flat.keys() and all(np.array_equal(merged[k], flat[k]) for k in flat)

    tokens = make_batch(cfg)[:4, :-1]
    one = mesh_of((1, 1, 1))
    with jax.set_mesh(one):
        plan = _plan(cfg, one)
        params = shd.to_params(flat, plan.abstract.params, plan.shardings.params)
        logits_one = np.asarray(nnx.merge(plan.graphdef, params)(tokens))
    eight = mesh_of((2, 2, 2))
    with jax.set_mesh(eight):
        plan = _plan(cfg, eight)
        sharded = jax.device_put(state.params, plan.shardings.params)
        logits_sharded = np.asarray(jax.jit(lambda p, t: nnx.merge(plan.graphdef, p)(t))(sharded, tokens))
    np.testing.assert_allclose(logits_one, logits_sharded, rtol=1e-5, atol=1e-5)

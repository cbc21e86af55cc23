"""Data, FSDP and tensor parallelism in any combination: equal losses, sharded bytes, collectives,
two processes through the launch script, and every shipped config compiling without replication."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY, tiny_config

from jaxinfra.core.errors import UserError
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.loading import load_config
from steps import compile_step, make_setup, mesh_of, run_steps

ROOT = Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (4, 2, 1)]


@pytest.fixture(scope="module")
def agree_cfg_and_ref():
    cfg = tiny_config("model.n_heads=8", "model.d_model=64", "model.d_ff=128")
    ref_params, ref, _, _ = run_steps(cfg, (1, 1, 1), n=5)
    assert ref[-1] < ref[0]
    return cfg, ref_params, ref


# (2, 2, 2) splits batch, parameters and heads at once in the fast lane; the one-axis layouts are the slow lane's
@pytest.mark.parametrize("shape", [s if s == (2, 2, 2) else pytest.param(s, marks=pytest.mark.slow) for s in MESHES],
                         ids=str)
def test_steps_agree_with_one_device_on_every_layout(agree_cfg_and_ref, shape):
    cfg, ref_params, ref = agree_cfg_and_ref
    params, losses, _, _ = run_steps(cfg, shape, n=5)
    # float32, same math in another reduction order: losses agree to 2e-6 relative
    np.testing.assert_allclose(losses, ref, rtol=2e-6, err_msg=str(shape))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(shape))


def test_fsdp_bytes_per_device_are_an_eighth():
    cfg = load_config(None, ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"])
    mesh = make_mesh(1, 8, 1)
    with jax.set_mesh(mesh):
        setup, _, _ = make_setup(cfg, mesh)
    state = setup.state
    total = shd.tree_bytes(state.params) + shd.tree_bytes(state.opt_state)
    per_device = [0] * 8
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        for s in leaf.addressable_shards:
            per_device[s.device.id] += s.data.nbytes
    for b in per_device:
        assert abs(b - total / 8) <= 0.05 * total / 8, (b, total / 8)
    lines, warning = shd.report(state.params, setup.logical, setup.shardings.params, meant_to_shard=True)
    assert warning is None and any("blocks/mlp/w_up" in line and "4x16x384" in line for line in lines)


def test_report_warns_when_a_sharding_strategy_replicates_params():
    cfg = load_config(None, ["mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1", "mesh.rules.embed=[]"])
    mesh = make_mesh(1, 8, 1)
    with jax.set_mesh(mesh):
        setup, _, _ = make_setup(cfg, mesh)
    _, warning = shd.report(setup.state.params, setup.logical, setup.shardings.params, meant_to_shard=True)
    assert warning is not None and "replicated" in warning


def _collectives(hlo: str) -> dict[str, int]:
    return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
            for op in ("all-gather", "reduce-scatter", "all-reduce", "all-to-all")}


def test_compiled_steps_hold_the_collectives_of_their_strategy():
    cfg = tiny_config("model.n_heads=8")
    found = {}
    for shape in [(8, 1, 1), (1, 8, 1), (1, 1, 8)]:
        mesh = mesh_of(shape)
        with jax.set_mesh(mesh):
            compiled, _, _ = compile_step(cfg, mesh)
        found[shape] = _collectives(compiled.as_text())
    dp, fsdp, tp = found[(8, 1, 1)], found[(1, 8, 1)], found[(1, 1, 8)]
    assert dp["all-reduce"] >= 1 and dp["all-gather"] == 0  # gradients all-reduced, weights never gathered
    assert fsdp["all-gather"] >= 2 * 2  # each layer's weights gathered (forward and backward)
    # gradient reduction: reduce-scatter, or all-reduce + slice where the backend (CPU) has no
    # reduce-scatter pass
    assert fsdp["reduce-scatter"] + fsdp["all-reduce"] >= 1
    assert tp["all-reduce"] >= 2 * 2  # partial sums after each attention and MLP block


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _train(args, launcher=None, timeout=240):
    cmd = ([str(ROOT / "scripts" / "launch_local.sh"), str(launcher)] if launcher
           else [sys.executable, str(ROOT / "scripts" / "train.py")])
    env = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, PYTHON=sys.executable)
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        left = _alive(proc.pid)  # any process of the run's group still there after it returned
    finally:
        if _alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not left, "the run left processes behind"
    return proc.returncode, out, err


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    args = [*TINY, "run.steps=5", "run.log_every=1", "run.eval_batches=0"]
    rc1, _, err1 = _train([*args, f"run.dir={tmp_path / 'one'}"])
    assert rc1 == 0, err1[-2000:]
    rc2, out2, err2 = _train([*args, f"run.dir={tmp_path / 'two'}"], launcher=2)
    assert rc2 == 0, err2[-2000:]
    assert "2 process(es)" in out2
    losses = [[json.loads(r)["loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert len(losses[0]) == 5
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-6)


def test_hybrid_mesh_needs_matching_granules():
    with pytest.raises(UserError, match="hybrid mesh"):
        make_mesh(2, 2, 2, dcn=(2, 1, 1))  # one process: one granule, not two
    with pytest.raises(UserError, match="mesh.fsdp=2 % mesh.dcn_fsdp=4"):
        make_mesh(2, 2, 2, dcn=(1, 4, 1))


@pytest.mark.parametrize("config", ["default", *(pytest.param(c, marks=pytest.mark.slow) for c in ("dp", "fsdp", "tp"))])
def test_shipped_configs_compile_without_replicating_activations(config, capfd, no_jit_cache):
    cfg = load_config(str(ROOT / "configs" / f"{config}.yaml"))
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    with jax.set_mesh(mesh):
        compiled, setup, _ = compile_step(cfg, mesh)
    assert compiled is not None
    # XLA's SPMD partitioner logs this (to the process's stderr) when it must replicate a tensor
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
    _, warning = shd.report(setup.state.params, setup.logical, setup.shardings.params,
                            meant_to_shard=mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1)
    assert warning is None

"""Pipeline parallelism over mesh.stage: the default Transformer's stacked layers split into stages,
GPipe and circular schedules, equal to one device; its HLO, bytes, bubble, checkpoints and errors."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import TINY, tiny_config
from etils import epath
from flax import nnx

from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import path_str, take, whole_layers
from jaxinfra.export import writer as export_lib
from jaxinfra.export import safetensors as safetensors_lib
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.parallel.pipeline import Stacked, idle_fraction, schedule
from steps import make_batch, make_setup, model_plan

ROOT = Path(__file__).resolve().parents[1]
# 4 layers split over up to 4 stages, a batch of 32 rows over up to 4 x 4 micro-batches and the batch axes
PP = ["model.n_layers=4", "data.batch_size=32"]


def _mesh(data=1, stage=1, fsdp=1, tensor=1):
    n = data * stage * fsdp * tensor
    return make_mesh(data, fsdp, tensor, stage=stage, devices=jax.devices()[:n])


def _steps(cfg, mesh, n=5):
    """n steps of the default model on batches of seeds 0..n-1: (losses, gathered params, state, setup)."""
    with jax.set_mesh(mesh):
        setup, _, batch_sh = make_setup(cfg, mesh)
        compiled = setup.plan.compile()
        state, losses = setup.state, []
        for i in range(n):
            state, metrics = compiled(state, {"tokens": jax.device_put(make_batch(cfg, seed=i), batch_sh["tokens"])})
            losses.append(float(metrics["loss"]))
        return losses, shd.gather(state.params), state, setup


@pytest.fixture(scope="module")
def one_device():
    cfg = tiny_config(*PP)
    losses, params, _, _ = _steps(cfg, _mesh())
    assert losses[-1] < losses[0]
    return losses, params


def _agree(found, ref, what):
    # float32, the same math over micro-batches: losses to 2e-6, parameters (5 Adam steps) to 1e-4
    np.testing.assert_allclose(found[0], ref[0], rtol=2e-6, err_msg=what)
    for a, b in zip(jax.tree.leaves(found[1]), jax.tree.leaves(ref[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=what)


@pytest.mark.parametrize("axes", [dict(stage=2), pytest.param(dict(stage=4), marks=pytest.mark.slow),
                                  pytest.param(dict(data=2, stage=2, tensor=2), marks=pytest.mark.slow),
                                  pytest.param(dict(stage=2, fsdp=4), marks=pytest.mark.slow)],
                         ids=["s2", "s4", "d2s2t2", "s2f4"])  # all but s2: the slow lane (docs/testing.md)
def test_gpipe_steps_equal_one_device(one_device, axes):
    S = axes["stage"]
    for M in (S, 2 * S, 4 * S):
        cfg = tiny_config(*PP, f"pipeline.microbatches={M}")
        losses, params, _, _ = _steps(cfg, _mesh(**axes))
        _agree((losses, params), one_device, f"{axes} M={M}")


@pytest.mark.slow
def test_circular_schedule_equals_one_device(one_device):
    for M in (2, 4):
        cfg = tiny_config(*PP, "pipeline.repeats=2", f"pipeline.microbatches={M}")
        losses, params, state, _ = _steps(cfg, _mesh(stage=2, tensor=2))
        assert state.params["blocks"]["attn"]["wq"].shape[:2] == (2, 2)  # (repeats, layers per repeat)
        flat = jax.tree.map(lambda a: a.reshape((4,) + a.shape[2:]) if a.ndim and a.shape[:2] == (2, 2) else a,
                            params)  # layer r * 2 + i of the one-device run
        _agree((losses, flat), one_device, f"circular M={M}")


@pytest.mark.slow
def test_scanned_layers_equal_the_unrolled_ones(one_device):
    """model.scan_layers=true: one compiled block looped over the layers, on one device and in each stage."""
    for axes in (dict(), dict(stage=2)):
        cfg = tiny_config(*PP, "model.scan_layers=true", "pipeline.microbatches=2")
        losses, params, _, _ = _steps(cfg, _mesh(**axes))
        _agree((losses, params), one_device, f"scan {axes}")


def _groups(hlo: str, op: str) -> list[list[int]]:
    """The device groups of every `op` in the HLO (explicit {{0,1},{2,3}} or iota [G,N]<=[...] form)."""
    out = []
    for line in hlo.splitlines():
        if not re.search(rf"\b{op}(-start)?\(", line):
            continue
        explicit = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
        if explicit:
            out += [[int(d) for d in g.split(",") if d] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))]
            continue
        iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
        if iota:
            g, n = int(iota.group(1)), int(iota.group(2))
            dims = [int(d) for d in iota.group(3).split(",")]
            ids = np.arange(int(np.prod(dims))).reshape(dims)
            if iota.group(4):
                ids = ids.transpose([int(d) for d in iota.group(4).split(",")])
            out += ids.reshape(g, n).tolist()
    return out


@pytest.mark.slow
def test_hlo_permutes_between_stages_and_never_gathers_across_them():
    cfg = tiny_config(*PP, "pipeline.microbatches=4")
    for axes in (dict(stage=2), dict(stage=2, fsdp=4)):
        mesh = _mesh(**axes)
        with jax.set_mesh(mesh):
            setup, _, _ = make_setup(cfg, mesh)
            hlo = setup.plan.compile().as_text()
        assert len(re.findall(r"\bcollective-permute(-start)?\(", hlo)) >= 2, axes  # forward and backward shifts
        stage_of = {int(d.id): s for s in range(2) for d in mesh.devices[:, s].flat}
        gathers = _groups(hlo, "all-gather")
        if "fsdp" not in axes:
            assert not gathers  # nothing but the stage axis: no parameter is ever gathered
        for group in gathers:  # FSDP gathers within a stage, never a layer from another stage
            assert len({stage_of[d] for d in group}) == 1, (axes, group)


@pytest.mark.slow
def test_each_device_holds_a_stage_share_of_the_layers():
    cfg = tiny_config(*PP, "pipeline.microbatches=4")
    for S in (2, 4):
        mesh = _mesh(stage=S)
        with jax.set_mesh(mesh):
            setup, _, _ = make_setup(cfg, mesh)
        state = setup.state
        for tree in (state.params["blocks"], state.opt_state):
            layers = [x for x in jax.tree.leaves(tree) if x.ndim and x.shape[0] == 4]
            whole = sum(x.nbytes for x in layers)
            assert whole > 0
            for device in mesh.devices.flat:
                held = sum(s.data.nbytes for x in layers for s in x.addressable_shards if s.device == device)
                assert held * S == whole, (S, device)


@pytest.mark.parametrize("S, M, R", [(2, 2, 1), (2, 8, 1), (4, 4, 1), (4, 16, 1), (2, 2, 2), (4, 8, 3)])
def test_schedule_bubble_is_the_formula(S, M, R):
    table = schedule(S, M, R)
    assert idle_fraction(table) == pytest.approx((S - 1) / (R * M + S - 1), abs=1e-12)
    for s in range(S):  # each stage runs every (micro-batch, repeat) once, in order
        assert [k for k in table[:, s] if k >= 0] == list(range(R * M))
    for k in range(R * M):  # item k reaches stage s + 1 one iteration after stage s
        at = [int(np.flatnonzero(table[:, s] == k)[0]) for s in range(S)]
        assert np.all(np.diff(at) == 1)


def _train(*args):
    """scripts/train.py in its own process (its own device count): the run folder's losses by step."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run.dir="))
    rows = [json.loads(r) for r in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, proc.stdout


BASE = [*TINY, *PP, "run.log_every=1", "run.eval_batches=0", "checkpoint.export_final=false"]
MESHES = {"pp": ["mesh.data=2", "mesh.stage=2", "mesh.fsdp=1", "mesh.tensor=2", "pipeline.microbatches=4"],
          "dft": ["mesh.stage=1"],  # (2, 2, 2)
          "one": ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.cpu_devices=1"]}


IN_PROCESS = {"pp": dict(data=2, stage=2, tensor=2), "dft": dict(data=2, fsdp=2, tensor=2), "one": {}}  # MESHES' meshes


def _restored(run_dir: Path, step: int, onto: str) -> dict[str, np.ndarray]:
    """Step `step` of run_dir restored in this process onto MESHES[onto]'s mesh (as a resume restores it),
    gathered, one array per layer under the names read_params gives."""
    mesh = _mesh(**IN_PROCESS[onto])
    with jax.set_mesh(mesh):
        plan = model_plan(tiny_config(*PP, *MESHES[onto]), mesh)
        state = ckpt_lib.resume(ckpt_lib.Checkpointer(str(run_dir / "checkpoints"), read_only=True), plan.abstract,
                                restore_step=step, stacked=plan.model.stacked)
        params = shd.gather(state.params)
    flat = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    layers = whole_layers({k: v.shape for k, v in flat.items()}, plan.model.stacked)
    return {name.replace("/", "."): take(flat[layer.stored], layer) for name, layer in layers.items()}


def _assert_same_arrays(found: dict[str, np.ndarray], expected: dict[str, np.ndarray], what: str) -> None:
    assert sorted(found) == sorted(expected), what
    for k in expected:
        np.testing.assert_array_equal(found[k], expected[k], err_msg=f"{what}: {k}")


@pytest.mark.slow
def test_stage_checkpoint_restores_onto_other_meshes_and_back(tmp_path):
    """A stage=2 run's step 3 onto (2,2,2) and one device: the same arrays, and step 4's loss equal to
    the stage=2 run's own; then those runs' step 4 back onto stage=2: the same arrays again."""
    args = [*BASE, "run.steps=4", "checkpoint.every=3", "checkpoint.keep=5"]
    first, _ = _train(*args, *MESHES["pp"], f"run.dir={tmp_path / 'pp'}")
    saved, _ = ckpt_reader.read_params(str(tmp_path / "pp"), 3)
    assert {f"blocks.{i}.attn.wq" for i in range(4)} <= set(saved)  # whole layers, as before stacking
    for name in ("dft", "one"):
        _assert_same_arrays(_restored(tmp_path / "pp", 3, name), saved, f"stage=2 step 3 onto {name}")
        d = tmp_path / f"onto-{name}"
        shutil.copytree(tmp_path / "pp" / "checkpoints" / "3", d / "checkpoints" / "3")
        losses, out = _train(*args, *MESHES[name], f"run.dir={d}")
        assert "resumed from step 3" in out and sorted(losses) == [4]
        np.testing.assert_allclose(losses[4], first[4], rtol=2e-6, err_msg=name)
        back, _ = ckpt_reader.read_params(str(d), 4)
        _assert_same_arrays(_restored(d, 4, "pp"), back, f"{name} step 4 back onto stage=2")
        d2 = tmp_path / f"back-{name}"
        shutil.copytree(d / "checkpoints" / "4", d2 / "checkpoints" / "4")
        _, out = _train(*args, *MESHES["pp"], "run.steps=5", f"run.dir={d2}")
        assert "resumed from step 4" in out
        restored, _ = ckpt_reader.read_params(str(d2), 5)
        assert sorted(restored) == sorted(back)


@pytest.mark.slow
def test_a_checkpoint_saved_before_layers_were_stacked_resumes(tmp_path):
    """tests/data/pre_stacking_run: 6 steps of jaxinfra d65e4c9 (blocks as a list) on one device,
    checkpointed at step 3. Resumed today, steps 4..6 repeat that run's losses."""
    src = ROOT / "tests" / "data" / "pre_stacking_run"
    old = {r["step"]: r["loss"] for r in map(json.loads, (src / "metrics.jsonl").read_text().splitlines())}
    d = tmp_path / "old"
    shutil.copytree(src / "checkpoints" / "3", d / "checkpoints" / "3")
    new, out = _train(*TINY, "run.steps=6", "run.log_every=1", "run.eval_batches=0", "checkpoint.export_final=false",
                      "checkpoint.every=3", *MESHES["one"], f"run.dir={d}")
    assert "resumed from step 3" in out
    # bit for bit: the stacked layers (unrolled, the default) compute what the list did, and weight decay
    # still skips the norm scales, stacked (layers, d_model) or not
    assert [new[s] for s in (4, 5, 6)] == [old[s] for s in (4, 5, 6)]
    # restored into the stacked layout: every tensor (parameters and Adam's moments) bit for bit, by layer
    mesh = _mesh()
    with jax.set_mesh(mesh):
        plan = model_plan(tiny_config(), mesh)
        state = ckpt_lib.resume(ckpt_lib.Checkpointer(str(src / "checkpoints"), read_only=True), plan.abstract,
                                stacked=plan.model.stacked)
    as_saved = ocp.PyTreeCheckpointHandler().restore(epath.Path(src / "checkpoints" / "3" / "state"))
    saved = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(as_saved)[0]}
    now = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(ckpt_lib.as_dict(state))[0]}
    layers = whole_layers({k: v.shape for k, v in now.items()}, plan.model.stacked)
    assert sorted(layers) == sorted(saved) and any("/mu/blocks/1/" in k for k in saved)
    for name, layer in layers.items():
        np.testing.assert_array_equal(take(now[layer.stored], layer), saved[name], err_msg=name)
    before, _ = ckpt_reader.read_params(str(d), 3)  # read by whole layer, as it always was, and the new step too
    after, _ = ckpt_reader.read_params(str(d), 6)
    assert sorted(before) == sorted(after) and "blocks.1.mlp.w_up" in after


@pytest.mark.slow
def test_exports_and_init_from_keep_whole_layer_names(tmp_path):
    circular = ["mesh.data=2", "mesh.stage=2", "mesh.fsdp=1", "mesh.tensor=2", "pipeline.repeats=2",
                "pipeline.microbatches=2"]
    _train(*TINY, *PP, "run.steps=2", "run.eval_batches=0", *circular, f"run.dir={tmp_path / 'a'}")
    path, _ = export_lib.newest_export(str(tmp_path / "a"))
    tensors = safetensors_lib.load(path)
    assert {f"blocks.{i}.attn.wq" for i in range(4)} <= set(tensors)
    assert tensors["blocks.3.attn.wq"].shape == (32, 4, 8)
    saved, _ = ckpt_reader.read_params(str(tmp_path / "a"))
    assert sorted(saved) == sorted(tensors)
    for k in saved:
        np.testing.assert_array_equal(saved[k], tensors[k])
    # a one-device run starts from the export (its 4 layers in order), and from the circular checkpoint
    for source in (path, str(tmp_path / "a")):
        d = tmp_path / f"b{len(source)}"
        _, out = _train(*TINY, *PP, "run.steps=1", "run.eval_batches=0", *MESHES["one"],
                        f"checkpoint.init_from={source}", f"run.dir={d}")
        assert "initialised the model from" in out
        np.testing.assert_array_equal(ckpt_reader.read_params(str(d), 1)[0]["blocks.3.attn.wq"].shape, (32, 4, 8))


class Scale(nnx.Module):
    """A block of a model of the user's own: y = x + tanh(x W)."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 8)) * 0.3, out_sharding=(None, None))

    def __call__(self, x):
        return x + jnp.tanh(x @ self.w[...])


class Own(nnx.Module):
    def __init__(self, stacked=True):
        rngs = nnx.Rngs(0)
        make = lambda: Scale(rngs)
        self.layers = Stacked(make, 4, microbatches=4) if stacked else nnx.List([make() for _ in range(4)])
        self.stacked = stacked

    def __call__(self, x):
        if self.stacked:
            return self.layers(x)
        for layer in self.layers:
            x = layer(x)
        return x


def _own(tmp_path, stacked, stage):
    from jaxinfra.train.trainer import train_model
    rows = [{"x": np.random.default_rng(i).normal(size=8).astype(np.float32)} for i in range(64)]
    cfg = tiny_config("data.batch_size=16", "run.steps=3", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1",
                      f"mesh.stage={stage}", f"run.dir={tmp_path / f'own{stacked}{stage}'}")
    loss = lambda model, batch: jnp.mean(model(batch["x"]) ** 2)
    return train_model(cfg, lambda: Own(stacked), loss, rows)


def test_a_model_of_your_own_pipelines_its_stacked_block(tmp_path):
    one, two = _own(tmp_path, True, 1), _own(tmp_path, True, 2)
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=2e-6)


def test_a_model_without_a_stacked_block_gets_one_line(tmp_path):
    with pytest.raises(UserError, match=r"mesh.stage=2.*Stacked"):
        _own(tmp_path, False, 2)


@pytest.mark.parametrize("override, message", [
    (["model.n_layers=3", "mesh.stage=2"], r"model.n_layers=3 is not divisible by mesh.stage=2"),
    (["model.n_layers=4", "mesh.stage=2", "pipeline.repeats=2", "pipeline.microbatches=1"],
     r"pipeline.microbatches=1 is below"),
    (["mesh.stage=2", "pipeline.microbatches=3"], r"pipeline.microbatches=3"),
    (["pipeline.repeats=0"], r"pipeline.repeats=0 must be at least 1"),
    (["mesh.stage=0"], r"mesh.stage=0 must be a positive size"),
])
def test_pipeline_mistakes_exit_2_with_one_line(tmp_path, override, message):
    args = [*TINY, "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.cpu_devices=2", *override,
            f"run.dir={tmp_path / 'r'}"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert "compiled" not in proc.stdout

"""A model and data written here, not in jaxinfra, trained through the public API on a (2, 2, 2)
mesh with its own logical axis names, pruning and checkpoints; and the API's input checks."""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config
from flax import nnx

import jaxinfra
from jaxinfra.data import sources as data

# one xdist worker runs the whole module, so its module-scoped training runs happen once
pytestmark = pytest.mark.xdist_group("test_user_model")

ROOT = Path(__file__).resolve().parents[1]
D_IN, WIDTH, N_OUT, N = 12, 32, 4, 256
RULES = ["mesh.rules.d_in=[fsdp]", "mesh.rules.width=[tensor]", "mesh.rules.n_out=[]"]
BASE = [*RULES, "data.batch_size=16", "run.steps=10", "run.log_every=1", "run.eval_every=0", "run.eval_batches=1",
        "optim.lr=1e-2", "optim.warmup_steps=1", "prune.sparsity=0.75", "prune.start_step=2", "prune.end_step=6",
        "prune.every=2", "checkpoint.every=5", "checkpoint.export_final=false"]


class Net(nnx.Module):
    """Two hidden layers; every parameter names logical axes that jaxinfra's defaults do not know."""

    def __init__(self, seed=0):
        key = iter(jax.random.split(jax.random.key(seed), 3))
        normal = lambda shape, names: nnx.Param(jax.random.normal(next(key), shape) / np.sqrt(shape[0]),
                                                out_sharding=names)
        self.w1 = normal((D_IN, WIDTH), ("d_in", "width"))
        self.w2 = normal((WIDTH, WIDTH), ("width", None))
        self.w3 = normal((WIDTH, N_OUT), ("width", "n_out"))
        self.b = nnx.Param(jnp.zeros((WIDTH,)), out_sharding=("width",))

    def __call__(self, x):
        h = jnp.tanh(x @ self.w1[...] + self.b[...])
        return jnp.tanh(h @ self.w2[...]) @ self.w3[...]


def xent(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def dataset(n=N, seed=0, dtype=np.float32):
    """A grain MapDataset over a list of examples: labels from a fixed random teacher."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype(dtype)
    y = np.argmax(x @ np.random.default_rng(99).normal(size=(D_IN, N_OUT)), -1).astype(np.int32)
    return grain.MapDataset.source([{"x": x[i], "y": y[i]} for i in range(n)])


def _losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="session")  # once per worker, even if xdist interleaves modules
def runs(tmp_path_factory):
    """One straight run on (2,2,2), the same run stopped at 5 and resumed, and one on a single device."""
    d = tmp_path_factory.mktemp("user_model")
    straight = jaxinfra.train_model(tiny_config(*BASE, f"run.dir={d / 'a'}"), Net, xent, dataset(), dataset(64, 1))
    stopped = jaxinfra.train_model(tiny_config(*BASE, f"run.dir={d / 'b'}", "run.stop_after=5"), Net, xent,
                                   dataset(), dataset(64, 1))
    resumed = jaxinfra.train_model(tiny_config(*BASE, f"run.dir={d / 'b'}"), Net, xent, dataset(), dataset(64, 1))
    one = jaxinfra.train_model(tiny_config(*BASE, f"run.dir={d / 'c'}", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"),
                               Net, xent, dataset(), dataset(64, 1),
                               options=jaxinfra.TrainOptions(mesh=jaxinfra.make_mesh(1, 1, 1, devices=jax.devices()[:1])))
    return d, straight, stopped, resumed, one


def test_trains_sharded_by_its_own_rules_and_prunes_exactly(runs):
    d, straight, *_ = runs
    losses = _losses(d / "a")
    assert len(losses) == 10 and np.mean(losses[-3:]) < losses[0] - 0.1, losses
    params = nnx.state(straight["model"], nnx.Param)
    assert params["w1"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert params["w3"][...].sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    for name in ("w1", "w2"):  # 2-D kernels pruned to exactly round(0.75 n) zeros; the bias never
        w = np.asarray(jaxinfra.gather(params[name][...]))
        assert int((w == 0).sum()) == round(0.75 * w.size), name
    assert not (np.asarray(jaxinfra.gather(params["b"][...])) == 0).all()
    assert not (np.asarray(jaxinfra.gather(params["w3"][...])) == 0).any()  # the output layer stays dense
    assert 0 <= straight["eval_loss"] < losses[0]


def test_checkpoint_holds_the_trained_parameters(runs):
    d, straight, *_ = runs
    flat, step = jaxinfra.read_params(str(d / "a"))
    assert step == 10 and sorted(flat) == ["b", "w1", "w2", "w3"]
    trained = nnx.to_pure_dict(nnx.state(straight["model"], nnx.Param))
    for name, value in flat.items():
        np.testing.assert_array_equal(value, jaxinfra.gather(trained[name]))


def test_resume_continues_bitwise(runs):
    d, _, stopped, resumed, _ = runs
    assert stopped["stopped_at"] == 5 and resumed["start_step"] == 5 and resumed["step"] == 10
    assert _losses(d / "b") == _losses(d / "a")


def _sparsity_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("sparsity")} for r in rows if "loss" in r]


def test_prune_inside_an_optax_chain_reports_sparsity_like_the_default(runs):
    d, straight, *_ = runs  # the default: prune.* in the config wraps the optimizer built from optim.*
    schedule = optax.constant_schedule(1e-2)
    sparsity = lambda step: jaxinfra.cubic_sparsity(step, 0.75, 2, 6)
    hidden = lambda path, leaf: path[-1].key in ("w1", "w2")  # what the default selection takes: not the output layer
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     jaxinfra.prune(optax.adamw(schedule), sparsity, update_every=2, start=2, end=6, include=hidden))
    mine = jaxinfra.train_model(tiny_config(*BASE, f"run.dir={d / 'chain'}", "prune.sparsity=0"), Net, xent,
                                dataset(), dataset(64, 1), options=jaxinfra.TrainOptions(optimizer=(tx, schedule)))
    rows, default_rows = _sparsity_rows(d / "chain"), _sparsity_rows(d / "a")
    assert len(rows) == 10 and rows[-1]["sparsity"] == 0.75 and set(rows[-1]) == set(default_rows[-1])
    assert [r["sparsity"] for r in rows] == [r["sparsity"] for r in default_rows]  # exact counts on both
    assert (d / "chain" / "sparsity.txt").read_text() == (d / "a" / "sparsity.txt").read_text()
    w1 = np.asarray(jaxinfra.gather(nnx.state(mine["model"], nnx.Param)["w1"][...]))
    assert int((w1 == 0).sum()) == round(0.75 * w1.size)


def test_one_device_matches_the_sharded_mesh(runs):
    d, *_ = runs
    np.testing.assert_allclose(_losses(d / "c"), _losses(d / "a"), rtol=2e-5)


def _cfg(tmp_path, *extra):
    return tiny_config(*BASE, f"run.dir={tmp_path}", *extra)


def test_unmapped_logical_axis_names_the_parameter(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"parameter b names logical axis 'width', which mesh.rules does not map"):
        cfg = tiny_config(*[o for o in BASE if "width" not in o], f"run.dir={tmp_path}")
        jaxinfra.train_model(cfg, Net, xent, dataset())
    assert "compiled" not in capsys.readouterr().out


def test_non_scalar_loss_is_refused_before_compiling(tmp_path, capsys):
    per_example = lambda model, batch: optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"])
    with pytest.raises(ValueError, match=r"loss_fn returned shape \(16,\), expected a scalar"):
        jaxinfra.train_model(_cfg(tmp_path), Net, per_example, dataset())
    assert "compiled" not in capsys.readouterr().out


def test_wrong_shapes_and_dtypes_in_the_data(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"train_source example 0: 'x' has shape \(12,\) and dtype float32, "
                                         r"expected shape \(8,\)"):
        jaxinfra.train_model(_cfg(tmp_path), Net, xent, dataset(),
                             options=jaxinfra.TrainOptions(example_spec={"x": ((8,), np.float32), "y": ((), np.int32)}))
    with pytest.raises(ValueError, match=r"eval_source example 0: 'x' has .* dtype float64, expected .* float32"):
        jaxinfra.train_model(_cfg(tmp_path), Net, xent, dataset(), dataset(32, 1, np.float64))
    assert "compiled" not in capsys.readouterr().out
    examples = [dict(e) for e in dataset(64)]
    examples[7]["x"] = examples[7]["x"][:5]  # one bad row deep in the source: caught when the loader reads it
    spec = {"x": ((D_IN,), np.float32), "y": ((), np.int32)}
    with pytest.raises(ValueError, match=r"train_source example 7: 'x' has shape \(5,\)"):
        for _ in zip(data.train_batches(examples, 16, seed=0, spec=spec), range(4)):  # one epoch reads row 7
            pass


def test_public_surface_is_documented_and_typed():
    assert "train_model" in jaxinfra.__all__ and "make_mesh" in jaxinfra.__all__ and "prune" in jaxinfra.__all__
    for name in jaxinfra.__all__:
        obj = getattr(jaxinfra, name)
        assert (obj.__doc__ or "").strip(), name
        if inspect.isfunction(obj):
            sig = inspect.signature(obj)
            assert sig.return_annotation is not inspect.Signature.empty, name
            assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), name


def test_import_does_not_start_the_backend():
    code = ("import jaxinfra\nfrom jaxinfra import Config, load_config, make_mesh, train_model\n"
            "cfg = load_config(None, ['mesh.rules.width=[tensor]'])\njaxinfra.use_cpu_devices(3)\n"
            "import jax\nassert len(jax.devices()) == 3, jax.devices()\nprint(make_mesh(3, 1, 1).shape)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert out.returncode == 0 and "('data', 3)" in out.stdout, out.stderr[-2000:]

"""State born sharded; one compiled step equal across meshes; accumulation, optimizers, divergence."""
import json

import jax
import numpy as np
import pytest

from jaxinfra.core.errors import Diverged
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.train.metrics import MetricsWriter, Reporter
from jaxinfra.train.trainer import Evaluator, fit
from steps import compile_step, make_batch, make_setup, run_steps


def test_params_and_opt_state_are_born_sharded(tiny):
    cfg = tiny()
    mesh = make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        setup, _, _ = make_setup(cfg, mesh)
    params = setup.state.params
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    per_device = setup.init_compiled.memory_analysis().output_size_in_bytes
    assert per_device < total / 2  # the compiled init writes shards, never the whole model
    wq = params["blocks"]["attn"]["wq"]  # (layers, d_model, heads, head_dim); no stage axis to split layers
    assert wq.sharding.spec == jax.sharding.PartitionSpec("stage", "fsdp", "tensor", None)
    assert wq.addressable_shards[0].data.shape == (wq.shape[0], wq.shape[1] // 2, wq.shape[2] // 2, wq.shape[3])
    mu = setup.state.opt_state[1][0].mu["blocks"]["attn"]["wq"]  # clip, then adamw's ScaleByAdamState
    assert mu.sharding == wq.sharding
    count = setup.state.opt_state[1][0].count
    assert count.sharding.is_fully_replicated and len(count.sharding.device_set) == 8


def test_gradient_accumulation_matches_the_full_batch(tiny):
    cfg = tiny("optim.clip_norm=0")
    full, full_loss, _, _ = run_steps(cfg, (2, 2, 2), n=1)
    acc, acc_loss, _, _ = run_steps(tiny("optim.clip_norm=0", "optim.grad_accum=2"), (2, 2, 2), n=1,
                                     accum_reshape=True)
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion", "adafactor"])
def test_each_optimizer_lowers_the_loss(tiny, name):
    lr = {"adamw": 1e-2, "sgd": 0.3, "lion": 1e-3, "adafactor": 1e-2}[name]
    _, losses, state, _ = run_steps(tiny(f"optim.name={name}", f"optim.lr={lr}"), (2, 2, 2), n=6, same_batch=True)
    assert losses[-1] < losses[0] - 0.05, losses
    assert int(state.step) == 6


class _Recorder:
    """What the loop reported, read back from the real metrics.jsonl: every step's row, and each
    evaluation's (step it was logged at, the step of the state it saw)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def evaluate(self, state):
        return {"eval_state_step": float(state.step)}

    def _rows(self):
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]

    @property
    def rows(self):
        return [(r.pop("step"), r) for r in self._rows() if "loss" in r]

    @property
    def evals(self):
        return [(r["step"], int(r["eval_state_step"])) for r in self._rows() if "eval_state_step" in r]


def _fit(cfg, steps, run_dir):
    mesh = make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        compiled, setup, batch_sh = compile_step(cfg, mesh)
        tokens = make_batch(cfg)
        batches = iter(lambda: {"tokens": jax.device_put(tokens, batch_sh["tokens"])}, None)
        rec = _Recorder(run_dir)
        writer = MetricsWriter(str(run_dir), steps, progress=False, tensorboard=False).open()
        reporter = Reporter(writer, log_every=1, last_step=steps, tokens_per_step=tokens.size)
        try:
            state = fit(setup.state, compiled, batches, steps=steps, reporter=reporter,
                        evaluator=Evaluator(rec.evaluate, every=3, last_step=steps))
        finally:
            writer.close()
        return state, rec


def test_fit_logs_every_step_in_order_and_evaluates(tiny, tmp_path):
    state, rec = _fit(tiny(), steps=7, run_dir=tmp_path)
    assert [s for s, _ in rec.rows] == list(range(1, 8))
    assert rec.evals == [(3, 3), (6, 6), (7, 7)]
    for _, m in rec.rows:
        assert {"loss", "grad_norm", "learning_rate", "step_time_s", "tokens_per_sec"} <= set(m)
    assert int(state.step) == 7


def test_divergence_stops_naming_the_step(tiny, tmp_path):
    with pytest.raises(Diverged, match=r"at step \d+"):
        _fit(tiny("optim.name=sgd", "optim.lr=1e30", "optim.clip_norm=0", "optim.warmup_steps=0"), steps=8,
             run_dir=tmp_path)

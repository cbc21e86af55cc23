"""Real models' habits through train_model: BatchNorm statistics and Dropout (the CNN of
examples/cnn_classifier.py), metrics beside the loss, evaluation of every example, pruning by role,
N:M along input channels, starting from a pretrained checkpoint or export, line progress."""
import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import COORDINATOR_PORT_TAKEN, listening_port, tiny_config
from flax import nnx

import jaxinfra
from jaxinfra.compress.pruning import n_of_m_mask
from jaxinfra.data import sources as data
from jaxinfra.export.safetensors import load

pytestmark = pytest.mark.xdist_group("test_own_model")  # one worker: the module's runs happen once

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cnn_example", ROOT / "examples" / "cnn_classifier.py")
cnn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cnn)

CNN_RULES = [f"mesh.rules.{k}={v}" for k, v in cnn.RULES.items()]
CNN = [*CNN_RULES, "run.steps=20", "run.log_every=1", "run.eval_every=10", "run.eval_batches=4", "data.batch_size=32",
       "optim.lr=3e-3", "optim.warmup_steps=2", "optim.weight_decay=0", "prune.pattern=2:4", "prune.start_step=6",
       "prune.exclude=[conv1/*]", "checkpoint.every=10", "run.progress=true"]
AXES = {"image": ("batch", None, None, None), "label": ("batch",)}
TRAIN, EVAL = cnn.Images(4096, seed=0), cnn.Images(100, seed=1)  # as the example; 100 eval examples: 3 x 32 and 4


def _train(*overrides, mesh=None):
    """train_model on the CNN; returns (result, what it printed)."""
    cfg = tiny_config(*CNN, *overrides)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = jaxinfra.train_model(cfg, lambda: cnn.make_model(cfg.run.seed), cnn.loss_fn, TRAIN, EVAL,
                                      options=jaxinfra.TrainOptions(batch_axes=AXES, mesh=mesh))
    return result, out.getvalue()


def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [r["loss"] for r in _rows(run_dir) if "loss" in r]


@pytest.fixture(scope="session")  # session: computed once per worker even if xdist interleaves modules
def runs(tmp_path_factory):
    """20 straight steps on (2,2,2); the same stopped at 10 and resumed; 5 steps on one device."""
    d = tmp_path_factory.mktemp("own_model")
    straight = _train(f"run.dir={d / 'a'}")
    stopped = _train(f"run.dir={d / 'b'}", "run.stop_after=10")
    resumed = _train(f"run.dir={d / 'b'}")
    one = _train(f"run.dir={d / 'one'}", "run.stop_after=5", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1",
                 mesh=jaxinfra.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    return d, straight, stopped, resumed, one


def _state(model, kind):
    return jax.tree.map(lambda x: np.asarray(jaxinfra.gather(x)), nnx.to_pure_dict(nnx.state(model, kind)))


def test_batch_statistics_change_and_evaluation_uses_them_over_every_example(runs):
    d, (result, out), *_ = runs
    stats = _state(result["model"], nnx.BatchStat)
    assert not np.allclose(stats["bn1"]["mean"], 0) and not np.allclose(stats["bn2"]["var"], 1)
    assert "evaluation: 100 examples in 4 batches (the last of 4)" in out
    model = result["model"]  # returned in eval mode: running averages, no dropout
    images, labels = EVAL.image, EVAL.label
    logits = np.asarray(model(jnp.asarray(images)))
    manual_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
    manual_acc = float(np.mean(np.argmax(logits, -1) == labels))
    assert result["eval_loss"] == pytest.approx(manual_loss, rel=1e-5)  # all 100, not 96
    assert result["eval_accuracy"] == pytest.approx(manual_acc, abs=1e-6)
    fresh = nnx.clone(model)  # the same model with its statistics back at their start
    for bn in (fresh.bn1, fresh.bn2):
        bn.mean.set_value(jnp.zeros_like(bn.mean[...]))
        bn.var.set_value(jnp.ones_like(bn.var[...]))
    fresh_loss = float(optax.softmax_cross_entropy_with_integer_labels(
        np.asarray(fresh(jnp.asarray(images))), labels).mean())
    assert abs(fresh_loss - manual_loss) > 1e-3


def test_metrics_beside_the_loss_reach_metrics_jsonl_and_tensorboard(runs):
    d, (result, out), *_ = runs
    rows = [r for r in _rows(d / "a") if "loss" in r]
    assert len(rows) == 20 and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert np.mean([r["accuracy"] for r in rows[-5:]]) > np.mean([r["accuracy"] for r in rows[:5]])
    events = b"".join(p.read_bytes() for p in (d / "a" / "tensorboard").iterdir())
    assert b"accuracy" in events and b"eval_accuracy" in events


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(runs):
    _, (_, out), *_ = runs
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("step ") and "/20: loss" in line]
    assert [line.split("/")[0] for line in lines] == [f"step {i}" for i in range(1, 21)]  # run.log_every=1


def test_twenty_steps_equal_ten_restart_ten_bitwise(runs):
    d, (straight, _), (stopped, _), (resumed, _), _ = runs
    assert stopped["stopped_at"] == 10 and resumed["start_step"] == 10
    assert _losses(d / "b") == _losses(d / "a")  # dropout and batch statistics included
    a, b = jaxinfra.read_params(str(d / "a"))[0], jaxinfra.read_params(str(d / "b"))[0]
    assert sorted(a) == sorted(b) and "bn1.mean" in a
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _start_pair(args, cwd, timeout=300):
    """Two processes of `args` with a coordinator on 127.0.0.1: their return codes and (stdout, stderr) as
    written (bytes decoded, no newline translation: a carriage return stays one), or None when process 0
    found the chosen port taken. Process 1 starts only once process 0 listens on that port, so it cannot
    reach another run's coordinator. Both process groups (a run's output filter is its child) are killed
    on the way out, whatever happened."""
    with socket.socket() as s:  # JAX's coordinator takes a port number, not a bound socket
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [*args, f"distributed.coordinator=127.0.0.1:{port}", "distributed.num_processes=2"]
    procs, readers, texts = [], [], []
    try:
        for i in range(2):
            procs.append(subprocess.Popen([*args, f"distributed.process_id={i}"], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True))
            for stream in (procs[i].stdout, procs[i].stderr):  # drained while they run: no pipe fills up
                texts.append([])
                readers.append(threading.Thread(target=texts[-1].extend, args=(stream,), daemon=True))
                readers[-1].start()
            if i == 0 and listening_port(procs[0], port, timeout=120) is None:  # it exited: why?
                readers[1].join(30)  # its stderr, to the end (EOF once its output filter exited too)
                if COORDINATOR_PORT_TAKEN.encode() in b"".join(texts[1]):
                    return None
                break  # another failure: reported below
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):  # all done, or one failed
            assert time.monotonic() < deadline, f"the two processes ran past {timeout} s"
            time.sleep(0.1)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        for r in readers:
            r.join(30)
    outs = [b"".join(t).decode(errors="replace") for t in texts]
    return [p.returncode for p in procs], list(zip(outs[::2], outs[1::2]))


@pytest.mark.slow
def test_five_steps_equal_on_one_device_the_mesh_and_two_processes(runs, tmp_path):
    d, *_ = runs
    for attempt in range(3):  # a new port when another process took the chosen one first
        run_dir = tmp_path / f"run{attempt}"
        args = [sys.executable, str(ROOT / "examples" / "cnn_classifier.py"), "--steps", "20", "--dir", str(run_dir),
                *[o for o in CNN if not o.startswith("run.progress")], "run.stop_after=5", "checkpoint.every=0"]
        if (started := _start_pair(args, cwd=tmp_path)) is not None:
            break
    else:
        raise AssertionError("three coordinator ports in a row were taken")
    codes, outs = started
    assert codes == [0, 0], "".join(err[-3000:] for _, err in outs)
    assert "2 process(es)" in outs[0][0]
    assert "\r" not in outs[0][0] and "step 5/20: loss" in outs[0][0]  # stdout a pipe: plain progress lines
    mesh = _losses(d / "a")[:5]
    np.testing.assert_allclose(_losses(d / "one"), mesh, rtol=2e-6)
    np.testing.assert_allclose(_losses(run_dir), mesh, rtol=2e-6)


def test_export_holds_the_batch_statistics(runs):
    d, (result, _), *_ = runs
    flat = load(str(d / "a" / "exports" / "model-20.safetensors"))
    stats = _state(result["model"], nnx.BatchStat)
    for layer in ("bn1", "bn2"):
        for kind in ("mean", "var"):
            np.testing.assert_array_equal(flat[f"{layer}.{kind}"], stats[layer][kind])


def test_default_selection_skips_the_output_layer_biases_and_the_excluded_conv(runs):
    _, (_, out), *_ = runs
    table = out.split("pruning:\n")[1].split("model:")[0]
    assert "conv2/kernel" in table and "2:4 along dim 2" in table and "linear1/kernel" in table
    assert "not pruned, output layer: linear2/kernel" in table
    assert "not pruned, prune.exclude 'conv1/*': conv1/bias, conv1/kernel" in table
    assert "not pruned, 1-D (bias, norm scale): bn1/bias" in table
    assert "2 tensors, 23,040 weights pruned" in table


def test_n_of_m_on_a_3x3_conv_groups_its_input_channels(runs):
    d, *_ = runs
    w = load(str(d / "a" / "exports" / "model-20.safetensors"))["conv2.kernel"]  # (3, 3, in 16, out 32)
    groups = (w != 0).reshape(3, 3, 4, 4, 32).sum(axis=3)  # groups of 4 consecutive input channels
    assert (groups == 2).all()
    x = jax.random.normal(jax.random.key(0), (3, 3, 8, 6))
    keep = np.asarray(n_of_m_mask(x, 2, 4, axis=2))
    ranked = np.argsort(-np.abs(np.asarray(x)).reshape(3, 3, 2, 4, 6), axis=3, kind="stable")[:, :, :, :2]
    want = np.zeros((3, 3, 2, 4, 6), bool)
    np.put_along_axis(want, ranked, True, axis=3)
    np.testing.assert_array_equal(keep, want.reshape(3, 3, 8, 6))


# A decoder as nanodo writes one: token and learned position tables, Linear layers, an output head.

class Decoder(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(64, 32, rngs=rngs)
        self.pos_embed = nnx.Embed(16, 32, rngs=rngs)
        self.pos_table = nnx.Param(jnp.zeros((16, 32)))  # a learned table added, as GPT-2 writes it
        self.attn_qkv = nnx.Linear(32, 96, rngs=rngs)
        self.attn_out = nnx.Linear(32, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.mlp = nnx.Linear(32, 64, rngs=rngs)
        self.mlp_out = nnx.Linear(64, 32, rngs=rngs)
        self.head = nnx.Linear(32, 64, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1])) + self.pos_table[...][:tokens.shape[1]]
        q, k, v = jnp.split(self.attn_qkv(x), 3, axis=-1)
        att = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 32 ** 0.5 + jnp.triu(jnp.full((16, 16), -1e9), 1))
        x = x + self.attn_out(jnp.einsum("bts,bsd->btd", att, v))
        x = x + self.mlp_out(nnx.gelu(self.mlp(self.norm(x))))
        return self.head(x)


def decoder_loss(model, batch):
    logits = model(batch["tokens"][:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:]).mean()


def test_default_selection_of_a_decoder_skips_embeddings_position_table_and_head(tmp_path, capsys):
    tokens = np.random.default_rng(0).integers(0, 64, (64, 17)).astype(np.int32)
    cfg = tiny_config(f"run.dir={tmp_path}", "run.steps=2", "prune.sparsity=0.5", "prune.schedule=oneshot",
                      "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "checkpoint.export_final=false")
    jaxinfra.train_model(cfg, lambda: Decoder(nnx.Rngs(0)), decoder_loss, [{"tokens": t} for t in tokens],
                         options=jaxinfra.TrainOptions(mesh=jaxinfra.make_mesh(1, 1, 1, devices=jax.devices()[:1])))
    table = capsys.readouterr().out.split("pruning:\n")[1].split("model:")[0]
    chosen = [line.split()[0] for line in table.splitlines()[1:] if line.strip() and not line.strip()[0].isdigit()
              and not line.strip().startswith("not pruned")]
    assert chosen == ["attn_out/kernel", "attn_qkv/kernel", "mlp/kernel", "mlp_out/kernel"]
    assert "not pruned, embedding (looked up): embed/embedding, pos_embed/embedding" in table
    assert "not pruned, output layer: head/kernel" in table
    assert "not pruned, not a matmul or conv weight (added or scaled: position tables, 2-D biases): pos_table" in table
    assert "attn_qkv/bias" in table.split("1-D (bias, norm scale): ")[1].splitlines()[0]


# Starting from a pretrained model: a dense MLP with BatchNorm, no dropout (its loss is deterministic).

RULES = ["mesh.rules.d_in=[fsdp]", "mesh.rules.width=[tensor]", "mesh.rules.n_out=[]"]


class BNNet(nnx.Module):
    def __init__(self, width=32, seed=0):
        rngs = nnx.Rngs(seed)
        part = lambda names: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
        self.l1 = nnx.Linear(12, width, kernel_init=part(("d_in", "width")), rngs=rngs)
        self.bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        self.l2 = nnx.Linear(width, width, kernel_init=part(("width", None)), rngs=rngs)
        self.out = nnx.Linear(width, 4, kernel_init=part(("width", "n_out")), rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.l2(nnx.relu(self.bn(self.l1(x))))))


def xent(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def blobs(n=512, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    y = np.argmax(x @ np.random.default_rng(9).normal(size=(12, 4)), -1).astype(np.int32)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


MLP = [*RULES, "data.batch_size=16", "run.log_every=1", "optim.lr=1e-2", "optim.warmup_steps=1"]


@pytest.fixture(scope="session")  # session: computed once per worker even if xdist interleaves modules
def dense(tmp_path_factory):
    """A dense pretrained run (5 steps), its trained model and its export."""
    d = tmp_path_factory.mktemp("dense")
    result = jaxinfra.train_model(tiny_config(*MLP, f"run.dir={d}", "run.steps=5"), BNNet, xent, blobs())
    return d, result


def _source_loss(result):
    """The source model's loss on the first batch a fresh run trains on (train mode: batch statistics)."""
    first = next(iter(data.train_batches(blobs(), 16, seed=0)))
    model = result["model"]
    model.train()
    try:
        return float(xent(model, jax.tree.map(jnp.asarray, first)))
    finally:
        model.eval()


def test_init_from_a_dense_checkpoint_prunes_it_to_80_percent(dense, tmp_path, capsys):
    d, source = dense
    cfg = tiny_config(*MLP, f"run.dir={tmp_path}", "run.steps=3", f"checkpoint.init_from={d}", "prune.sparsity=0.8",
                      "prune.schedule=oneshot", "prune.start_step=0")
    result = jaxinfra.train_model(cfg, BNNet, xent, blobs())
    out = capsys.readouterr().out
    assert f"initialised the model from {d}/checkpoints/5 (step 5)" in out
    assert _losses(tmp_path)[0] == pytest.approx(_source_loss(source), rel=1e-5)
    params = _state(result["model"], nnx.Param)
    for layer in ("l1", "l2"):
        w = params[layer]["kernel"]
        assert int((w == 0).sum()) == round(0.8 * w.size), layer
    assert not (params["out"]["kernel"] == 0).any()  # the output layer stays dense


def test_init_from_an_export_fine_tunes_it(dense, tmp_path):
    d, source = dense
    cfg = tiny_config(*MLP, f"run.dir={tmp_path}", "run.steps=2",
                      f"checkpoint.init_from={d / 'exports' / 'model-5.safetensors'}")
    jaxinfra.train_model(cfg, BNNet, xent, blobs())
    assert _losses(tmp_path)[0] == pytest.approx(_source_loss(source), rel=1e-5)


def test_init_from_a_model_of_another_shape_names_both_shapes(dense, tmp_path):
    d, _ = dense
    cfg = tiny_config(*MLP, f"run.dir={tmp_path}", "run.steps=2", f"checkpoint.init_from={d}")
    with pytest.raises(jaxinfra.UserError, match=r"tensor bn.bias has shape \(32,\), the model's is \(64,\)"):
        jaxinfra.train_model(cfg, lambda: BNNet(width=64), xent, blobs())


def test_more_steps_on_a_finished_run_say_how_the_learning_rate_jumps(dense, tmp_path, capsys):
    d = tmp_path / "run"
    shutil.copytree(dense[0], d)  # the fixture's run stays as it is for the other tests
    jaxinfra.train_model(tiny_config(*MLP, f"run.dir={d}", "run.steps=8"), BNNet, xent, blobs())
    out = capsys.readouterr().out
    assert "run.steps is 8, but step 5 was saved by a run of 5 steps: the learning rate jumps from" in out
    assert "run.stop_after" in out


def test_an_optimizer_of_your_own_is_wrapped_in_prune(tmp_path, capsys):
    cfg = tiny_config(*MLP, f"run.dir={tmp_path}", "run.steps=3", "prune.sparsity=0.5", "prune.schedule=oneshot")
    result = jaxinfra.train_model(cfg, BNNet, xent, blobs(), options=jaxinfra.TrainOptions(optimizer=(optax.adam(1e-2), None)))
    assert "the optimizer passed to train_model is wrapped in pruning" in capsys.readouterr().out
    w = _state(result["model"], nnx.Param)["l2"]["kernel"]
    assert int((w == 0).sum()) == round(0.5 * w.size)


def test_a_loss_returning_logits_is_refused_in_one_line(tmp_path):
    with_logits = lambda model, batch: (xent(model, batch), model(batch["x"]))
    with pytest.raises(jaxinfra.UserError, match=r"loss_fn returned a tuple of 2 \(shape \(\), shape \(16, 4\)\): "
                                                 r"return the loss, or \(loss, \{name: scalar\}\)"):
        jaxinfra.train_model(tiny_config(*MLP, f"run.dir={tmp_path}"), BNNet, with_logits, blobs())
    clobbers = lambda model, batch: (xent(model, batch), {"step": jnp.float32(0)})
    with pytest.raises(jaxinfra.UserError, match="loss_fn's metric 'step' has the name of a metric the trainer logs"):
        jaxinfra.train_model(tiny_config(*MLP, f"run.dir={tmp_path}"), BNNet, clobbers, blobs())


def test_roles_follow_stacked_layers_and_a_split_fused_kernel():
    from jaxinfra.compress.roles import find_roles

    def stacked(p, x):  # layers stacked on a leading axis, read with a traced index (fori_loop)
        return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x).sum()

    def fused(p, x):  # one QKV kernel, split before its matmuls
        q, k, v = jnp.split(p["qkv"], 3, axis=1)
        return ((x @ q) * (x @ k) + x @ v).sum()

    roles = find_roles(stacked, {"w": jnp.zeros((3, 8, 8))}, jnp.zeros((2, 8)))
    assert roles["w"].kind == "kernel" and roles["w"].in_dim == 1  # the input features, not the layer axis
    roles = find_roles(fused, {"qkv": jnp.zeros((8, 24))}, jnp.zeros((2, 8)))
    assert roles["qkv"].kind == "kernel" and roles["qkv"].in_dim == 0


class Noisy(nnx.Module):
    """A Linear whose loss logs a signature of one dropout mask."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.l1 = nnx.Linear(12, 4, kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                        ("d_in", "n_out")), rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)


def noisy_loss(model, batch):
    mask = model.drop(jnp.ones(64)) != 0
    loss = optax.softmax_cross_entropy_with_integer_labels(model.drop(model.l1(batch["x"])), batch["y"]).mean()
    return loss, {"mask": jnp.sum(mask * 2.0 ** (jnp.arange(64) % 20))}


def test_dropout_masks_differ_between_steps_and_match_on_every_mesh(tmp_path):
    cfg = lambda d, *o: tiny_config("mesh.rules.d_in=[fsdp]", "mesh.rules.n_out=[]", "data.batch_size=16", "run.log_every=1",
                                    "run.steps=5", f"run.dir={d}", *o)
    jaxinfra.train_model(cfg(tmp_path / "a"), Noisy, noisy_loss, blobs())
    jaxinfra.train_model(cfg(tmp_path / "one", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"), Noisy, noisy_loss,
                         blobs(), options=jaxinfra.TrainOptions(mesh=jaxinfra.make_mesh(1, 1, 1, devices=jax.devices()[:1])))
    masks = [r["mask"] for r in _rows(tmp_path / "a") if "mask" in r]
    assert len(masks) == 5 and len(set(masks)) == 5  # a new mask every step
    assert masks == [r["mask"] for r in _rows(tmp_path / "one") if "mask" in r]  # the same on one device
    jaxinfra.train_model(cfg(tmp_path / "b", "run.seed=1"), Noisy, noisy_loss, blobs())
    assert [r["mask"] for r in _rows(tmp_path / "b") if "mask" in r] != masks  # another seed, other masks

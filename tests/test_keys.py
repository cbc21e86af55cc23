"""Config keys that were only ever parsed, now checked by what they do (issue 29): the learning rate the
optimizer applies under optim.schedule=linear|constant and optim.min_lr_ratio, Adam's and Lion's b1/b2/eps,
SGD's momentum, prune.criterion=random, checkpoint.keep_every and checkpoint.export_dtype on disk,
quant.params/exclude, model.param_dtype, mesh.dcn_stage/dcn_tensor, run.sample_temperature and the
shipped configs/pp.yaml. Every expectation is computed here from the documented formula or by Optax
itself, never copied from a run."""
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY, tiny_config
from flax import nnx

from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.compress.pruning import find_prune_state
from jaxinfra.core.errors import UserError
from jaxinfra.export import safetensors as safetensors_lib
from jaxinfra.lm import job
from jaxinfra.models import factory
from jaxinfra.models.sampling import sample
from jaxinfra.models.transformer import lm_loss
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.loading import load_config
from jaxinfra.settings.sections import MESH_AXES
from jaxinfra.train import compression
from jaxinfra.train.optim import make_optimizer
from jaxinfra.train.step import abstract_model
from steps import make_batch, make_setup, mesh_of

pytestmark = pytest.mark.xdist_group("test_keys")  # the module-scoped run is made once, on one worker


# ---------------------------------------------------------------- optimizer and schedule (unit level)

def _plain(*overrides):
    """An OptimConfig whose update is nothing but the optimizer's own math: no clipping, no decay."""
    return tiny_config("optim.clip_norm=0", "optim.weight_decay=0", *overrides).optim


def _applied_lrs(cfg, steps, n):
    """The learning rate each of n updates applies: SGD without momentum on a gradient of ones moves
    every parameter by exactly -lr_t."""
    tx, schedule = make_optimizer(cfg, steps)
    params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}
    grads = jax.tree.map(jnp.ones_like, params)
    state, out = tx.init(params), []
    for t in range(n):
        updates, state = tx.update(grads, state, params)
        u = np.asarray(updates["w"])
        assert np.all(u == u.flat[0]) and np.array_equal(np.asarray(updates["b"]), u[0])
        out.append(-float(u.flat[0]))
        assert float(schedule(t)) == pytest.approx(out[-1], rel=1e-6)  # what the metrics report as lr
    return out


def _documented_lr(t, *, schedule, lr, ratio, warmup, steps):
    """optim.py's make_schedule, as its docstring and config.py say it: linear warmup from 0 to lr over
    warmup steps, then linear to lr * min_lr_ratio, a half cosine to it, or lr flat, until `steps`."""
    if t < warmup:
        return lr * t / warmup
    p = min((t - warmup) / (steps - warmup), 1.0)
    end = lr * ratio
    if schedule == "linear":
        return lr + (end - lr) * p
    if schedule == "cosine":
        return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * p))
    return lr


@pytest.mark.parametrize("schedule,ratio", [("linear", 0.2), ("linear", 0.0), ("constant", 0.2),
                                            ("cosine", 0.25)])
def test_schedule_and_min_lr_ratio_set_the_applied_learning_rate(schedule, ratio):
    lr, warmup, steps = 0.5, 2, 10
    cfg = _plain("optim.name=sgd", "optim.momentum=0", f"optim.lr={lr}", f"optim.schedule={schedule}",
                 f"optim.warmup_steps={warmup}", f"optim.min_lr_ratio={ratio}", f"run.steps={steps}")
    applied = _applied_lrs(cfg, steps, steps + 2)
    want = [_documented_lr(t, schedule=schedule, lr=lr, ratio=ratio, warmup=warmup, steps=steps)
            for t in range(steps + 2)]
    np.testing.assert_allclose(applied, want, rtol=1e-6, atol=1e-9)
    # three steps spelled out: warmup, the middle of the decay, and past the end
    assert applied[1] == pytest.approx(lr / 2, rel=1e-6)
    mid = {"linear": lr + (lr * ratio - lr) * 0.5, "constant": lr,
           "cosine": lr * ratio + (lr - lr * ratio) * 0.5}[schedule]
    assert applied[6] == pytest.approx(mid, rel=1e-6)  # (6 - 2) / (10 - 2): halfway
    assert applied[steps + 1] == pytest.approx(lr if schedule == "constant" else lr * ratio, rel=1e-6, abs=1e-9)


def test_the_default_optimizer_follows_the_linear_schedule_too():
    """adamw applies the same schedule: on a constant gradient each bias-corrected update is lr_t * g / (|g| + eps)."""
    lr, warmup, steps, ratio = 0.01, 1, 6, 0.3
    cfg = _plain("optim.name=adamw", f"optim.lr={lr}", "optim.schedule=linear", f"optim.warmup_steps={warmup}",
                 f"optim.min_lr_ratio={ratio}", f"run.steps={steps}", "optim.eps=1e-12")
    tx, _ = make_optimizer(cfg, steps)
    params, grads = {"w": jnp.zeros((4,))}, {"w": jnp.full((4,), 0.5)}
    state = tx.init(params)
    for t in range(steps + 1):
        updates, state = tx.update(grads, state, params)
        want = _documented_lr(t, schedule="linear", lr=lr, ratio=ratio, warmup=warmup, steps=steps)
        np.testing.assert_allclose(-np.asarray(updates["w"]), want, rtol=1e-5, atol=1e-12)


def _grads(n, shapes=((5, 3), (3,))):
    rng = np.random.default_rng(7)
    return [{"w": jnp.asarray(rng.normal(size=shapes[0]) * 0.01, jnp.float32),
             "b": jnp.asarray(rng.normal(size=shapes[1]) * 0.01, jnp.float32)} for _ in range(n)]


def _updates(tx, grads):
    params = jax.tree.map(jnp.zeros_like, grads[0])
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


def _assert_same(found, want):
    for a, b in zip(found, want):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-12)


def _differs(found, other):
    return any(not np.allclose(x, y, rtol=1e-3, atol=0) for a, b in zip(found, other)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_adam_b1_b2_eps_are_optax_adams():
    # gradients of 1e-2 next to eps=1e-2: eps matters as much as the moments do
    cfg = _plain("optim.name=adamw", "optim.lr=0.1", "optim.schedule=constant", "optim.warmup_steps=0",
                 "optim.b1=0.5", "optim.b2=0.7", "optim.eps=0.01")
    grads = _grads(3)
    found = _updates(make_optimizer(cfg, 10)[0], grads)
    _assert_same(found, _updates(optax.adam(0.1, b1=0.5, b2=0.7, eps=0.01), grads))
    for other in (dict(b1=0.9, b2=0.7, eps=0.01), dict(b1=0.5, b2=0.95, eps=0.01), dict(b1=0.5, b2=0.7, eps=1e-8)):
        assert _differs(found, _updates(optax.adam(0.1, **other), grads)), other  # each value is read


def test_lion_b1_b2_are_optax_lions():
    cfg = _plain("optim.name=lion", "optim.lr=0.1", "optim.schedule=constant", "optim.warmup_steps=0",
                 "optim.b1=0.3", "optim.b2=0.6")
    grads = _grads(3)
    found = _updates(make_optimizer(cfg, 10)[0], grads)
    _assert_same(found, _updates(optax.lion(0.1, b1=0.3, b2=0.6, weight_decay=0.0), grads))
    assert _differs(found, _updates(optax.lion(0.1, weight_decay=0.0), grads))


def test_sgd_momentum_is_optax_sgd_with_momentum():
    grads = _grads(3)
    base = ("optim.name=sgd", "optim.lr=0.1", "optim.schedule=constant", "optim.warmup_steps=0")
    found = _updates(make_optimizer(_plain(*base, "optim.momentum=0.7"), 10)[0], grads)
    _assert_same(found, _updates(optax.sgd(0.1, momentum=0.7), grads))
    plain = _updates(make_optimizer(_plain(*base, "optim.momentum=0"), 10)[0], grads)
    _assert_same(plain, _updates(optax.sgd(0.1), grads))
    _assert_same(found[:1], plain[:1])  # the first step has no history yet
    assert _differs(found[1:], plain[1:])
    # the velocity by hand: v_t = g_t + 0.7 v_{t-1}, update = -0.1 v_t
    v = jax.tree.map(jnp.zeros_like, grads[0])
    for g, u in zip(grads, found):
        v = jax.tree.map(lambda g_, v_: g_ + 0.7 * v_, g, v)
        _assert_same([u], [jax.tree.map(lambda x: -0.1 * x, v)])


# ---------------------------------------------------------------- prune.criterion=random

def _masks(criterion, params):
    """The masks a one-shot 50% prune computes at its first update, through the library's optimizer."""
    cfg = tiny_config("prune.sparsity=0.5", "prune.schedule=oneshot", "prune.start_step=0",
                      f"prune.criterion={criterion}")
    tx, _ = make_optimizer(cfg.optim, cfg.run.steps, cfg.prune)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    return {k: np.asarray(v) for k, v in find_prune_state(state).masks.items()}


def test_random_criterion_prunes_the_target_fraction_independently_of_magnitude():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(32, 24)), jnp.float32),
              "v": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32), "b": jnp.ones((24,))}
    mag, rnd = _masks("magnitude", params), _masks("random", params)
    assert mag["b"].ndim == 0 and rnd["b"].ndim == 0  # 1-D: never pruned
    for name in ("w", "v"):
        w = np.abs(np.asarray(params[name]))
        k = round(0.5 * w.size)
        assert (~mag[name]).sum() == k and (~rnd[name]).sum() == k  # exactly the target sparsity
        assert w[~mag[name]].max() <= w[mag[name]].min()  # magnitude: the k smallest |w|
        assert not np.array_equal(rnd[name], mag[name])
        # random: the pruned half is no smaller than the kept half (magnitude's mean ratio here is ~0.3)
        assert 0.75 < w[~rnd[name]].mean() / w[rnd[name]].mean() < 1.33
    # deterministic: built again, and even on other weights, the same mask (its scores ignore |w|)
    other = jax.tree.map(lambda x: x[::-1] * 3.0, params)
    for again in (_masks("random", params), _masks("random", other)):
        assert all(np.array_equal(again[n], rnd[n]) for n in rnd)
    assert not np.array_equal(_masks("magnitude", other)["w"], mag["w"])


# ---------------------------------------------------------------- quant.params / quant.exclude

@pytest.mark.parametrize("overrides,chosen", [
    (["quant.params=[mlp, head]", "quant.exclude=[blocks/*/mlp/w_down]"],
     {"blocks/mlp/w_gate": 1, "blocks/mlp/w_up": 1, "head": 0}),
    (["quant.exclude=[head, blocks/*/attn/*]"],
     {"blocks/mlp/w_gate": 1, "blocks/mlp/w_up": 1, "blocks/mlp/w_down": 1}),
], ids=["params+exclude", "exclude"])
def test_quant_params_and_exclude_round_exactly_the_chosen_kernels(overrides, chosen):
    """`chosen`: each kernel the keys select and the dim its matmul contracts (x @ w contracts d_model
    of w_gate / w_up (layers, D, F), d_ff of w_down (layers, F, D), d_model of head (D, V))."""
    cfg = tiny_config("quant.weights=int8", *overrides)
    mesh = mesh_of((1, 1, 1))
    with jax.set_mesh(mesh):
        model = abstract_model(factory.model_fn(cfg, mesh))
        micro = {"tokens": jax.ShapeDtypeStruct((cfg.data.batch_size, cfg.model.seq_len + 1), jnp.int32)}
        model, kernels = compression.quantized_model(cfg.quant, model, compression.model_roles(model, lm_loss, micro),
                                                     "float32")
    assert set(kernels) == {p.replace("/", ".") for p in chosen}
    rng = np.random.default_rng(0)
    flat, treedef = jax.tree_util.tree_flatten_with_path(model.params)
    params = jax.tree_util.tree_unflatten(treedef, [rng.normal(size=a.shape).astype(np.float32) for _, a in flat])
    rounded = jax.jit(model.forward)(params)
    for (path, w), (_, r) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                 jax.tree_util.tree_flatten_with_path(rounded)[0]):
        name, r = "/".join(str(getattr(k, "key", k)) for k in path), np.asarray(r)
        if name not in chosen:
            np.testing.assert_array_equal(r, w, err_msg=name)  # left in float, bit for bit
            continue
        # symmetric int8, one scale per channel (every dim but the contracted one): scale = absmax / 127.5
        scale = np.abs(w).max(axis=chosen[name], keepdims=True) / 127.5
        q = r / scale
        assert np.abs(q - np.round(q)).max() < 1e-3, name  # on the channel's int8 grid
        assert np.round(q).min() >= -128 and np.round(q).max() <= 127, name
        assert np.abs(np.round(q) - w / scale).max() <= 0.5 + 1e-3, name  # the nearest grid point
        assert not np.array_equal(r, w), name


# ---------------------------------------------------------------- model.param_dtype (unit level)

def _dot_dtypes(jaxpr):
    """The operand dtypes of every dot_general in a jaxpr and the jaxprs inside it."""
    out = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.update(str(v.aval.dtype) for v in eqn.invars)
        for sub in eqn.params.values():
            for one in sub if isinstance(sub, (tuple, list)) else (sub,):
                inner = getattr(one, "jaxpr", one)
                if hasattr(inner, "eqns"):
                    out |= _dot_dtypes(inner)
    return out


def test_param_dtype_stores_the_weights_and_dtype_still_computes():
    mesh = mesh_of((1, 1, 1))
    tokens = jnp.asarray(make_batch(tiny_config(), seed=1)[:4])
    loss_of = lambda model: jax.jit(lambda p: lm_loss(model.module(p), {"tokens": tokens}))
    with jax.set_mesh(mesh):
        models = {}
        for dtype, param_dtype in [("float32", "bfloat16"), ("bfloat16", "float32"), ("float32", "float32")]:
            cfg = tiny_config(f"model.dtype={dtype}", f"model.param_dtype={param_dtype}")
            model = models[dtype, param_dtype] = abstract_model(factory.model_fn(cfg, mesh))
            assert {str(x.dtype) for x in jax.tree.leaves(model.params)} == {param_dtype}
            jaxpr = jax.make_jaxpr(lambda p: lm_loss(model.module(p), {"tokens": tokens}))(model.params).jaxpr
            assert _dot_dtypes(jaxpr) == {dtype}, (dtype, param_dtype)  # every matmul in model.dtype
        # bf16 weights under float32 compute: exactly the float32 model's loss on those weights widened
        rng = np.random.default_rng(0)
        bf16 = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, jnp.bfloat16),
                            models["float32", "bfloat16"].params)
        narrow = float(loss_of(models["float32", "bfloat16"])(bf16))
        wide = float(loss_of(models["float32", "float32"])(jax.tree.map(lambda x: x.astype(jnp.float32), bf16)))
    assert narrow == pytest.approx(wide, rel=1e-6)


# ---------------------------------------------------------------- one run: keep_every, export_dtype, ...

RUN = dict(steps=6, every=2, keep=1, keep_every=4, temperature=0.7, tokens=8)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """One LM run: checkpoints every 2 steps keeping 1 plus every 4th step, bf16 master weights, a float16
    export, and samples at temperature 0.7 (the sampler's arguments and result recorded)."""
    run_dir = tmp_path_factory.mktemp("keys") / "run"
    cfg = tiny_config(f"run.dir={run_dir}", f"run.steps={RUN['steps']}", f"checkpoint.every={RUN['every']}",
                      f"checkpoint.keep={RUN['keep']}", f"checkpoint.keep_every={RUN['keep_every']}",
                      "checkpoint.export_dtype=float16", "model.param_dtype=bfloat16",
                      f"run.sample_tokens={RUN['tokens']}", f"run.sample_temperature={RUN['temperature']}",
                      "run.eval_batches=0", "run.peak_flops=1e12")
    calls = []

    def recording(*args, **kwargs):
        out = sample(*args, **kwargs)
        calls.append((args, kwargs, out))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(job, "sample", recording)
        final = job.run(cfg)
    assert len(calls) == 1
    return cfg, run_dir, final, calls[0]


def test_keep_every_keeps_those_steps_while_keep_rotates_the_rest(lm_run):
    _, run_dir, final, _ = lm_run
    assert final["step"] == RUN["steps"]
    saved = list(range(RUN["every"], RUN["steps"] + 1, RUN["every"]))  # 2, 4, 6
    want = set(saved[-RUN["keep"]:]) | {s for s in saved if s % RUN["keep_every"] == 0}
    assert want == {4, 6}  # keep=1 alone would leave {6}: step 4 is there only by keep_every, 2 rotated out
    on_disk = {int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit()}
    assert on_disk == want
    assert ckpt_lib.Checkpointer(str(run_dir / "checkpoints"), read_only=True).steps() == sorted(want)
    assert not [d for d in os.listdir(run_dir / "checkpoints") if "tmp" in d]  # every save committed


def _safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def test_export_dtype_writes_that_dtype(lm_run):
    _, run_dir, _, _ = lm_run
    path = run_dir / "exports" / f"model-{RUN['steps']}.safetensors"
    header = {k: v for k, v in _safetensors_header(path).items() if k != "__metadata__"}
    assert header and {v["dtype"] for v in header.values()} == {"F16"}
    stored, step = ckpt_reader.read_params(str(run_dir / "checkpoints"))
    assert step == RUN["steps"] and set(stored) == set(header)
    exported = safetensors_lib.load(str(path))
    for name, w in stored.items():  # the saved weights, rounded once to float16
        assert exported[name].dtype == np.float16
        np.testing.assert_array_equal(exported[name], w.astype(np.float16), err_msg=name)


def test_param_dtype_is_the_stored_dtype_after_training(lm_run):
    _, run_dir, final, _ = lm_run
    stored, _ = ckpt_reader.read_params(str(run_dir / "checkpoints"))
    assert {str(w.dtype) for w in stored.values()} == {"bfloat16"}  # the optimizer never widened them
    assert np.isfinite(final["loss"])


def test_sample_temperature_is_what_the_run_samples_at(lm_run):
    cfg, _, _, (args, kwargs, texts) = lm_run
    assert kwargs["temperature"] == RUN["temperature"] and kwargs["seed"] == cfg.run.seed
    graphdef, params, prompts = args
    again = lambda **k: sample(graphdef, params, prompts, **{**kwargs, **k})
    assert again() == texts  # reproducible: same seed, same text
    assert [t[:len(p)] for t, p in zip(texts, prompts)] == list(prompts)  # each prompt, continued
    greedy = again(temperature=0.0)
    assert texts != greedy  # > 0 draws from the softmax: not the argmax
    # greedy by hand: the argmax of the model's next-byte logits, one byte at a time (windows padded with
    # 255, not the sampler's 0s: a causal model never reads past the last real byte)
    L = kwargs["seq_len"]
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    rows = [list(p.encode()) for p in prompts]
    for _ in range(kwargs["n_tokens"]):
        window = np.full((8, L), 255, np.int32)  # 8 rows: any batch split of the (2, 2, 2) mesh
        for i, r in enumerate(rows):
            window[i, :len(r)] = r
        logits = np.asarray(shd.gather(forward(params, window)))
        for i, r in enumerate(rows):
            r.append(int(np.argmax(logits[i, len(r) - 1])))
    assert [bytes(r).decode("utf-8", errors="replace") for r in rows] == greedy


# ---------------------------------------------------------------- mesh.dcn_stage / mesh.dcn_tensor

class _OnHost:
    """A CPU device as a process of a multi-host job would see it: same device, another process_index
    (what jax's hybrid mesh groups by when devices carry no slice_index)."""

    def __init__(self, device, process):
        self.device, self.process_index = device, process

    def __getattr__(self, name):
        return getattr(self.device, name)


def _expected_grid(shape, dcn, granules):
    """The hybrid layout make_mesh's docstring gives (jax's hybrid device mesh): each axis of size
    s = dcn x inner, the dcn factor outermost; granule g (processes in order) at the row-major index of
    the dcn coordinates, and inside a granule its devices in order over the inner shape (a CPU granule
    has no topology to reorder them by)."""
    inner = tuple(s // d for s, d in zip(shape, dcn))
    grid = np.empty(shape, object)
    for idx in np.ndindex(*shape):
        g = np.ravel_multi_index(tuple(i // n for i, n in zip(idx, inner)), dcn)
        grid[idx] = np.asarray(granules[g], object).reshape(inner)[tuple(i % n for i, n in zip(idx, inner))]
    return grid


@pytest.mark.parametrize("keys,processes", [(["mesh.dcn_stage=2"], 2), (["mesh.dcn_tensor=2"], 2),
                                            (["mesh.dcn_stage=2", "mesh.dcn_tensor=2"], 4)],
                         ids=["stage", "tensor", "stage+tensor"])
def test_dcn_keys_lay_the_axis_across_processes(keys, processes):
    cfg = tiny_config("mesh.data=2", "mesh.stage=2", "mesh.fsdp=1", "mesh.tensor=2", *keys)
    m = cfg.mesh
    per = 8 // processes
    devices = [_OnHost(d, i // per) for i, d in enumerate(jax.devices())]
    mesh = make_mesh(m.data, m.fsdp, m.tensor, dcn=m.dcn(), stage=m.stage, devices=devices)  # as job.run calls it
    shape = (2, 2, 1, 2)
    assert tuple(mesh.shape.values()) == shape and tuple(mesh.axis_names) == MESH_AXES
    granules = [devices[g * per:(g + 1) * per] for g in range(processes)]
    want = _expected_grid(shape, m.dcn(), granules)
    assert [[d.id for d in row] for row in mesh.devices.reshape(-1, 2)] == \
        [[d.id for d in row] for row in want.reshape(-1, 2)]
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    for axis, name in enumerate(MESH_AXES):  # an axis crosses processes exactly when its dcn key says so
        varies = bool(np.any(np.diff(procs, axis=axis))) if shape[axis] > 1 else False
        assert varies == (getattr(m, f"dcn_{name}") > 1), name


def test_dcn_stage_on_one_process_is_one_line_before_compiling(tmp_path):
    """On this single process there is one granule: a dcn factor of 2 cannot be laid out, and job.run says
    so from the config (a real two-process stage split is test_pp_yaml_across_two_processes, slow)."""
    cfg = tiny_config(f"run.dir={tmp_path}", "mesh.data=2", "mesh.stage=2", "mesh.fsdp=1", "mesh.tensor=2",
                      "mesh.dcn_stage=2")
    with pytest.raises(UserError, match=r"hybrid mesh: in-node shape \(2, 1, 1, 2\) x across-node shape "
                                        r"\(1, 2, 1, 1\) does not fit the processes"):
        job.run(cfg)


# ---------------------------------------------------------------- configs/pp.yaml

PP_TINY = TINY  # the tiny model: 2 blocks, one a stage


def _losses(cfg, mesh, n=3):
    """n steps on batches of seeds 0..n-1, as test_pipeline's: (losses, initial and final gathered params, state)."""
    with jax.set_mesh(mesh):
        setup, _, batch_sh = make_setup(cfg, mesh)
        compiled = setup.plan.compile()
        state, losses = setup.state, []
        first = shd.gather(state.params)
        for i in range(n):
            state, metrics = compiled(state, {"tokens": jax.device_put(make_batch(cfg, seed=i), batch_sh["tokens"])})
            losses.append(float(metrics["loss"]))
        return losses, (first, shd.gather(state.params)), state


@pytest.mark.slow  # ~20 s of CPU on a cold compilation cache: the pipelined step's compile is most of it
def test_pp_yaml_trains_and_equals_one_device():
    cfg = load_config("pp", PP_TINY)
    m = cfg.mesh
    assert (m.data, m.stage, m.fsdp, m.tensor, cfg.pipeline.microbatches) == (2, 2, 1, 2, 8)
    mesh = make_mesh(m.data, m.fsdp, m.tensor, dcn=m.dcn(), stage=m.stage)  # as job.run builds it
    losses, (first, params), state = _losses(cfg, mesh)
    wq = state.params["blocks"]["attn"]["wq"]
    assert wq.sharding.spec[0] == "stage" and wq.addressable_shards[0].data.shape[0] == 1  # a layer a stage
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(first)))  # trained
    ref_losses, (ref_first, ref_params), _ = _losses(tiny_config(), mesh_of((1, 1, 1)))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(ref_first)):
        np.testing.assert_array_equal(a, b)  # the same initial model
    # test_pipeline's tolerance: float32, the same math over micro-batches
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dcn", ["mesh.dcn_stage=2", "mesh.dcn_tensor=2"])
def test_pp_yaml_across_two_processes(tmp_path, dcn):
    """pp.yaml through the launch script on two processes of 4 CPU devices each, the stage (or tensor)
    axis across them: the same losses as one process."""
    from test_parallel import _train
    args = ["--config", "pp", *PP_TINY, "run.steps=3", "run.log_every=1", "run.eval_batches=0",
            "checkpoint.export_final=false", "run.peak_flops=1e12"]
    rc1, _, err1 = _train([*args, f"run.dir={tmp_path / 'one'}"])
    assert rc1 == 0, err1[-2000:]
    rc2, out2, err2 = _train([*args, dcn, f"run.dir={tmp_path / 'two'}"], launcher=2)
    assert rc2 == 0, err2[-2000:]
    assert "2 process(es)" in out2
    losses = [[json.loads(r)["loss"] for r in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(r)] for d in ("one", "two")]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-6)

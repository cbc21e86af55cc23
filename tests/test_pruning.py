"""Magnitude pruning: exact counts with ties, N:M, schedule, persistence under AdamW, sharded masks."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra.compress.pruning import cubic_sparsity, exact_mask, n_of_m_mask, prune
from jaxinfra.parallel.mesh import make_mesh


def _params(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(64, 48)).astype(np.float32)
    w[:10] = 0.5  # many exact ties
    return {"a": {"kernel": jnp.asarray(w)}, "b": {"kernel": jnp.asarray(rng.normal(size=(32, 4, 8)), jnp.float32)},
            "norm": {"scale": jnp.ones(48)}, "embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}


@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.8, 0.99])
def test_exact_count_even_with_ties(s):
    w = _params()["a"]["kernel"]
    k = round(s * w.size)
    keep = jax.jit(exact_mask)(w, jnp.asarray(k))
    assert int((~keep).sum()) == k
    # the pruned set is the k smallest |w| (a kept entry is never smaller than a pruned one)
    if 0 < k < w.size:
        assert float(jnp.abs(w)[keep].min()) >= float(jnp.abs(w)[~keep].max())


def test_n_of_m_keeps_exactly_n_per_group():
    w = _params()["a"]["kernel"]
    keep = np.asarray(jax.jit(n_of_m_mask, static_argnums=(1, 2))(w, 2, 4))
    groups = keep.reshape(16, 4, 48).sum(axis=1)
    assert (groups == 2).all()
    a = np.abs(np.asarray(w)).reshape(16, 4, 48)
    k = keep.reshape(16, 4, 48)
    assert (np.where(k, a, np.inf).min(axis=1) >= np.where(k, -np.inf, a).max(axis=1)).all()


def test_cubic_schedule():
    for t, want in [(0, 0.0), (9, 0.0), (10, 0.0), (15, 0.8 * (1 - 0.5 ** 3)), (20, 0.8), (30, 0.8)]:
        assert abs(float(cubic_sparsity(jnp.asarray(t), 0.8, 10, 20)) - want) < 1e-6


def test_pruned_coordinates_stay_zero_under_adamw_and_moments_are_masked():
    params = _params()
    tx = prune(optax.adamw(1e-2, weight_decay=0.1), lambda t: cubic_sparsity(t, 0.8, 2, 6), update_every=2,
               start=2, end=6)
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
        grads = jax.tree.map(lambda p: jnp.sin(p * 3.0 + i), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(10):
        params, state = step(params, state, i)
        kernel = params["a"]["kernel"]
        zeros = int((kernel == 0).sum())
        if i >= 6:
            assert zeros == round(0.8 * kernel.size)
    assert int((params["b"]["kernel"] == 0).sum()) == round(0.8 * params["b"]["kernel"].size)
    assert int((params["embed"] == 0).sum()) == 0 and bool((params["norm"]["scale"] != 0).all())  # excluded
    mask = state.masks["a"]["kernel"]
    mu = state.inner[0].mu["a"]["kernel"]
    assert bool((mu[~mask] == 0).all()) and bool((params["a"]["kernel"][~mask] == 0).all())


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sharded_masks_equal_one_device_and_gather_nothing(scope):
    params = {"a": _params()["a"], "b": _params()["b"]}
    tx = prune(optax.sgd(0.0), lambda t: jnp.asarray(0.7), start=0, end=0, scope=scope)

    def masks_of(p):
        return tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[1].masks

    one = jax.jit(masks_of)(params)
    mesh = make_mesh(2, 2, 2)
    sh = {"a": {"kernel": NamedSharding(mesh, P("fsdp", "tensor"))},
          "b": {"kernel": NamedSharding(mesh, P("fsdp", "tensor", None))}}
    sharded = jax.device_put(params, sh)
    with jax.set_mesh(mesh):
        compiled = jax.jit(masks_of, in_shardings=(sh,)).lower(sharded).compile()
        many = compiled(sharded)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    total = sum(x.size for x in jax.tree.leaves(params))
    pruned = sum(int((~m).sum()) for m in jax.tree.leaves(many))
    assert pruned == (round(0.7 * total) if scope == "global" else sum(round(0.7 * x.size) for x in jax.tree.leaves(params)))
    assert "all-gather" not in compiled.as_text()  # thresholds from scalar counts, never a gathered tensor


def test_ties_at_the_threshold_are_broken_by_index():
    w = _params()["a"]["kernel"]  # rows 0..9 hold 480 entries equal to 0.5
    below = int((jnp.abs(w) < 0.5).sum())
    keep = np.asarray(jax.jit(exact_mask)(w, jnp.asarray(below + 100)))
    tied_pruned = (~keep) & (np.abs(np.asarray(w)) == 0.5)
    assert int((~keep).sum()) == below + 100 and int(tied_pruned.sum()) == 100
    assert tied_pruned.reshape(-1).nonzero()[0].max() < np.flatnonzero(np.abs(np.asarray(w)).reshape(-1) == 0.5)[100]



def test_tensors_bisected_together_match_each_alone():
    """Layer scope bisects all tensors in one loop; a tensor with ties to split beside ones without."""
    params = {"a": _params()["a"], "b": _params()["b"]}
    w = params["a"]["kernel"]
    s = (int((jnp.abs(w) < 0.5).sum()) + 100) / w.size  # the threshold of `a` falls inside its ties
    tx = prune(optax.sgd(0.0), lambda t: jnp.asarray(s), start=0, end=0)
    masks = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[1].masks)(params)
    for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(m), np.asarray(exact_mask(x, jnp.round(s * x.size))))


def test_pruned_run_end_to_end_keeps_exact_zeros_in_the_export(tmp_path, capsys):
    import json

    from conftest import TINY

    from jaxinfra import cli
    from jaxinfra.export import safetensors as safetensors_lib
    run_dir = tmp_path / "run"
    assert cli.main([*TINY, "run.steps=10", "run.log_every=1", f"run.dir={run_dir}", "prune.sparsity=0.5",
                     "prune.start_step=2", "prune.end_step=5", "prune.every=2"]) == 0
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sparsity = {r["step"]: r["sparsity"] for r in rows if "sparsity" in r}
    # updates 0..9 are logged as steps 1..10; masks change at updates 2, 4 and 5 (end)
    assert sparsity[1] == sparsity[2] == 0.0
    for update in (2, 4, 5):
        assert abs(sparsity[update + 1] - float(cubic_sparsity(jnp.asarray(update), 0.5, 2, 5))) < 2e-3
    assert sparsity[10] == sparsity[6] and abs(sparsity[10] - 0.5) < 1e-3
    flat = safetensors_lib.load(str(run_dir / "exports" / "model-10.safetensors"))
    for name, w in flat.items():
        zeros = int((w == 0).sum())
        if w.ndim >= 2 and name not in ("embed", "head"):
            assert zeros == round(0.5 * w.size), name
            last = [r for r in rows if "sparsity" in r][-1]  # logged per stacked tensor: all layers alike here
            stacked = re.sub(r"^blocks\.\d+\.", "blocks.", name)
            assert last[f"sparsity/{stacked.replace('.', '/')}"] == pytest.approx(zeros / w.size)
        else:
            assert zeros == 0, name
    table = (run_dir / "sparsity.txt").read_text()
    assert f"{'blocks/1/mlp/w_up':32s} {1024:10,d} {2048:10,d} {0.5:8.2%}" in table  # d_model 32 x d_ff 64, a layer
    assert "sparsity per pruned tensor" in capsys.readouterr().out
    # groups run along each kernel's input features: wo (heads, kv, embed) along kv, of size 8
    assert cli.main([*TINY, f"run.dir={tmp_path / 'nm'}", "prune.pattern=3:16"]) == 2
    err = capsys.readouterr().err
    assert "parameter blocks/attn/wo (2x4x8x32) groups along dim 2" in err and "not divisible by M=16" in err, err


def test_parameters_chosen_by_path_glob_or_logical_name():
    from jaxinfra.compress.roles import select
    from jaxinfra.core.errors import UserError
    from jaxinfra.settings.loading import load_config
    from jaxinfra.train.optim import make_optimizer
    params = _params()
    logical = {"a": {"kernel": P("embed", "mlp")}, "b": {"kernel": P("embed", "heads", "kv")},
               "norm": {"scale": P("norm")}, "embed": P("vocab", "embed")}
    # a 1-D tensor only by its full path: a glob that matches it (norm/*) alone does not take it
    for chosen, exclude, want in ((["a/*"], [], {"a"}), (["heads"], [], {"b"}), (["norm/scale", "mlp"], [], {"a", "norm"}),
                                  (["*"], ["embed"], {"a", "b"})):
        cfg = load_config(None, ["prune.sparsity=0.5", "prune.schedule=oneshot", "prune.start_step=0",
                                 f"prune.params={chosen}", f"prune.exclude={exclude}"])
        selection = select(params, logical, {}, cfg.prune.params, cfg.prune.exclude)
        tx, _ = make_optimizer(cfg.optim, 10, cfg.prune, selection)
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
        pruned = {k for k, v in state.masks.items() if any(m.ndim and not bool(m.all()) for m in jax.tree.leaves(v))}
        assert pruned == want, chosen
    with pytest.raises(UserError, match="prune.params: 'blocks/\\*/mpl/\\*' matches no parameter"):
        select(params, logical, {}, ["blocks/*/mpl/*", "a/*"])
    with pytest.raises(UserError, match="prune.exclude: 'nrm/\\*' matches no parameter"):
        select(params, logical, {}, [], ["nrm/*"])


def test_erk_gives_each_tensor_its_own_exact_count_and_the_total():
    from jaxinfra.compress.pruning import (
        erk_sparsities,
        layer_sparsity,
        sparsity_metrics,
    )
    params = {"small": jnp.asarray(np.random.default_rng(1).normal(size=(8, 8)), jnp.float32),
              "big": jnp.asarray(np.random.default_rng(2).normal(size=(256, 64)), jnp.float32),
              "wide": jnp.asarray(np.random.default_rng(3).normal(size=(16, 4, 64)), jnp.float32)}
    shapes = [x.shape for x in jax.tree.leaves(params)]
    targets = erk_sparsities(shapes, 0.8)
    sizes = [x.size for x in jax.tree.leaves(params)]
    assert abs(sum(t * n for t, n in zip(targets, sizes)) / sum(sizes) - 0.8) < 1e-9
    assert targets[jax.tree.leaves(params).index(params["big"])] > 0.8  # big tensors pruned harder
    tx = prune(optax.sgd(0.0), lambda t: jnp.where(t >= 0, 0.8, 0.0), start=0, end=0, erk=0.8,
               include=lambda p, x: True)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    for x, mask, t in zip(jax.tree.leaves(params), jax.tree.leaves(state.masks), targets):
        assert int((~mask).sum()) == round(t * x.size)
    rows = jax.jit(layer_sparsity)(state.masks)
    reported = jax.jit(sparsity_metrics)(state)  # the per-step metrics: counts kept in the state
    for name, mask in state.masks.items():
        assert float(rows[f"sparsity/{name}"]) == pytest.approx(float((~mask).mean()), abs=1e-7)
        assert float(reported[f"sparsity/{name}"]) == pytest.approx(float((~mask).mean()), abs=1e-7)
    recount = sum(int((~m).sum()) for m in jax.tree.leaves(state.masks)) / sum(sizes)
    assert float(reported["sparsity"]) == pytest.approx(recount, abs=1e-7)


def test_pruning_config_errors_and_recovery_warning():
    from jaxinfra.core.errors import UserError
    from jaxinfra.settings.loading import load_config
    with pytest.raises(UserError, match="prune.distribution=erk .* prune.scope=layer"):
        load_config(None, ["prune.sparsity=0.5", "prune.end_step=5", "prune.distribution=erk", "prune.scope=global"])
    late = load_config(None, ["run.steps=100", "prune.sparsity=0.5", "prune.end_step=90"])
    assert "only 10 of run.steps=100" in late.prune.warnings(late.run.steps)[0]
    ok = load_config(None, ["run.steps=100", "prune.sparsity=0.5", "prune.end_step=80"])
    assert ok.prune.warnings(ok.run.steps) == []


@pytest.mark.slow
def test_compiled_step_keeps_masks_sharded_like_parameters_and_equal_across_meshes(tiny):
    from steps import run_steps
    cfg = tiny("prune.sparsity=0.5", "prune.schedule=oneshot", "prune.start_step=0")  # masks from the init
    masks = {}
    for shape in ((1, 1, 1), (2, 2, 2), (1, 8, 1)):
        _, _, state, _ = run_steps(cfg, shape, n=1)
        pruned = [(m, p) for m, p in zip(jax.tree.leaves(state.opt_state.masks), jax.tree.leaves(state.params))
                  if m.ndim]
        assert len(pruned) == 7  # wq, wk, wv, wo and the 3 MLP kernels, each (2 layers, ...)
        assert all(m.shape[0] == 2 for m, _ in pruned)
        for m, p in pruned:
            assert m.sharding == p.sharding  # the step's outputs: each mask sharded like its parameter
        masks[shape] = [np.asarray(m) for m, _ in pruned]
    for shape in ((2, 2, 2), (1, 8, 1)):
        for a, b in zip(masks[(1, 1, 1)], masks[shape]):
            np.testing.assert_array_equal(a, b)

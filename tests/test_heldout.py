"""The like-for-like final figure: every held-out byte scored exactly once, with context."""
import math
import random

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from jaxinfra.lm import heldout
from jaxinfra.models import factory
from jaxinfra.models.transformer import lm_loss
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.train.step import build_model


@pytest.mark.parametrize("seed", range(20))
def test_windows_score_every_byte_once_with_context(seed):
    rng = random.Random(seed)
    L = rng.randint(1, 40)
    stride, n = rng.randint(1, L), rng.randint(L + 1, 500)
    starts, weight = heldout.windows(n, L, stride)
    scored = np.zeros(n, int)
    for s, w in zip(starts, weight):
        assert 0 <= s <= n - L - 1  # every window lies inside the bytes
        for j in np.flatnonzero(w):
            scored[s + 1 + j] += 1
            assert j >= min(s, L - stride) or s == 0  # after the first window, L - stride bytes of context
    assert scored[0] == 0 and (scored[1:] == 1).all()


def _model(mesh, *overrides):
    cfg = tiny_config(*overrides)
    model = build_model(factory.model_fn(cfg, mesh), mesh, cfg.mesh.logical_rules)
    graphdef, params = nnx.split(model, nnx.Param)
    return cfg, model, graphdef, params


def test_one_window_equals_the_training_loss_and_the_first_byte_costs_eight_bits():
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])  # a batch of one window
    cfg, model, graphdef, params = _model(mesh)
    L = cfg.model.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, L + 1).astype(np.uint8)
    with jax.set_mesh(mesh):
        got = heldout.bits_per_byte(graphdef, params, tokens, L, mesh, cfg.mesh.logical_rules)
        loss = float(lm_loss(model, {"tokens": jax.numpy.asarray(tokens[None].astype(np.int32))}))
    assert got == pytest.approx((8 + L * loss / math.log(2)) / (L + 1), rel=1e-5)


def test_the_mesh_gives_the_one_device_figure():
    tokens = np.frombuffer(open(np.__file__.replace("__init__.py", "_globals.py"), "rb").read(), np.uint8)[:3000]
    figures = []
    for mesh in (make_mesh(2, 2, 2), make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        cfg, _, graphdef, params = _model(mesh)
        with jax.set_mesh(mesh):
            figures.append(heldout.bits_per_byte(graphdef, params, tokens, cfg.model.seq_len, mesh,
                                                 cfg.mesh.logical_rules))
    assert figures[0] == pytest.approx(figures[1], rel=1e-6)
    assert 7 < figures[0] < 9  # an untrained byte model: about 8 bits a byte


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="stride"):
        heldout.windows(10, 16, 8)

"""The NNX transformer: shapes, causality, logical annotations, remat and compute dtype."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfra.models.transformer import Transformer, lm_loss, rope_frequencies, rotary_at
from jaxinfra.settings.model import ModelConfig
from jaxinfra.train.step import abstract_model


def _model(cfg):
    with nnx.use_eager_sharding(False):
        return Transformer(cfg.model, rngs=nnx.Rngs(0))


def test_forward_shape_and_causality(tiny):
    cfg = tiny()
    model = _model(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    forward = nnx.jit(lambda m, t: m(t))
    logits = forward(model, tokens)
    assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
    logits2 = forward(model, changed)
    np.testing.assert_array_equal(logits[:, :10], logits2[:, :10])  # the past never sees the future
    assert not np.allclose(logits[:, 10:], logits2[:, 10:])


def test_every_parameter_names_logical_axes(tiny):
    cfg = tiny()
    model = abstract_model(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    abstract, logical = model.params, model.logical
    shapes = jax.tree.leaves(abstract)
    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(shapes) == len(specs) == 2 + 9 + 1  # the blocks stacked: 9 tensors of (n_layers, ...)
    for shape, spec in zip(shapes, specs):
        assert len(spec) == len(shape.shape) and all(isinstance(n, str) for n in spec)
    assert logical["blocks"]["attn"]["wq"] == jax.sharding.PartitionSpec("layers", "embed", "heads", "kv")
    assert abstract["blocks"]["attn"]["wq"].shape == (2, 32, 4, 8)


def test_rotary_preserves_norm_and_encodes_relative_position():
    x = jax.random.normal(jax.random.key(0), (1, 8, 2, 16))
    freq, pos = rope_frequencies(ModelConfig(d_model=32, n_heads=2)), jnp.arange(8)[None]
    rotary = jax.jit(lambda x: rotary_at(x, pos, freq))
    y = rotary(x)
    np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(y, axis=-1), rtol=1e-5)
    q = jnp.broadcast_to(x[:, :1], x.shape)  # same vector at every position
    rq = rotary(q)
    dots = jnp.einsum("bthk,bthk->bth", rq[:, 1:], rq[:, :-1])  # neighbours: same relative offset
    np.testing.assert_allclose(dots, jnp.broadcast_to(dots[:, :1], dots.shape), rtol=1e-4)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(tiny, remat):
    batch = {"tokens": jax.random.randint(jax.random.key(2), (2, 17), 0, 256)}
    grads = []
    for policy in ("none", remat):
        model = _model(tiny(f"model.remat={policy}"))
        grads.append(nnx.jit(nnx.grad(lm_loss))(model, batch))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_flops_per_token_formula(tiny):
    from jaxinfra.models.transformer import train_flops_per_token
    cfg = tiny().model  # D=32, F=64, L=2, V=256, T=16
    assert train_flops_per_token(cfg) == 6 * (2 * (4 * 32 * 32 + 3 * 32 * 64) + 32 * 256) + 6 * 2 * 16 * 32


def test_bf16_compute_with_f32_params(tiny):
    model = _model(tiny("model.dtype=bfloat16"))
    assert model.blocks.mlp.w_up[...].dtype == jnp.float32
    batch = {"tokens": jax.random.randint(jax.random.key(3), (2, 17), 0, 256)}
    loss32 = nnx.jit(lm_loss)(_model(tiny()), batch)
    loss16 = nnx.jit(lm_loss)(model, batch)
    assert loss16.dtype == jnp.float32 and abs(float(loss16) - float(loss32)) < 0.05

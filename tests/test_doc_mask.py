"""Document masking in the default Transformer: packed windows (segments + positions) keep documents
apart, on one device, on the (2, 2, 2) mesh and through the pipeline; the unpacked model is untouched."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from jax.sharding import NamedSharding

from jaxinfra.core.errors import UserError
from jaxinfra.models.factory import model_fn
from jaxinfra.models.transformer import Transformer, lm_loss
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.train.step import build_model

# Float32 logits of the same math compiled apart (the mask a runtime array, or a window of another
# layout) differ by float32 rounding alone: XLA's CPU backend orders the softmax's reductions otherwise
# (measured: probabilities up to 8 ulps apart, logits of |x| < 4 at most 9.5e-7 apart over 2 layers).
# 3e-6 is ~6 ulps of the largest logits; a leak across documents moves logits by 1e-2 and more.
ROUNDING = dict(rtol=0, atol=3e-6)

# one row: documents of 5 (begun in an earlier window, so positions 3..7), 7 and 4 tokens; the other: 9, 7
SEGMENTS = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 9 + [2] * 7], np.int32)
POSITIONS = np.array([[*range(3, 8), *range(7), *range(4)], [*range(9), *range(7)]], np.int32)


def _model(cfg):
    with nnx.use_eager_sharding(False):
        return Transformer(cfg.model, rngs=nnx.Rngs(0))


def _tokens(shape, seed=0, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, shape, dtype=np.int32)


forward = nnx.jit(lambda m, t, s, p: m(t, s, p))
plain = nnx.jit(lambda m, t: m(t))


def packed_batch(B, L, seed=0):
    """Windows of L tokens, each packed with documents of random lengths (the first one begun in an
    earlier window): {"tokens", "segments", "positions"}, int32 (B, L)."""
    rng = np.random.default_rng(seed)
    segments, positions = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, L), size=rng.integers(1, 4), replace=False))
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, L])):
            segments[b, lo:hi] = i + 1
            positions[b, lo:hi] = np.arange(hi - lo) + (rng.integers(0, 20) if i == 0 else 0)
    return {"tokens": rng.integers(0, 256, (B, L), dtype=np.int32), "segments": segments, "positions": positions}


@pytest.mark.parametrize("overrides", [[], ["model.scan_layers=true", "model.remat=dots"]], ids=["unrolled", "scan"])
def test_other_documents_never_see_a_changed_document(tiny, overrides):
    model = _model(tiny(*overrides))
    tokens = _tokens((2, 16))
    changed = tokens.copy()
    changed[0, 5:12] = (tokens[0, 5:12] + 1 + _tokens(7, seed=1, high=255)) % 256  # every token of doc 2, row 0
    changed[1, :9] = (tokens[1, :9] + 1) % 256  # row 1's first document
    before, after = forward(model, tokens, SEGMENTS, POSITIONS), forward(model, changed, SEGMENTS, POSITIONS)
    others = [(0, slice(0, 5)), (0, slice(12, 16)), (1, slice(9, 16))]
    for row, cols in others:  # the earlier document (causality alone) and the later ones (the mask): the same bits
        np.testing.assert_array_equal(before[row, cols], after[row, cols])
    assert not np.allclose(before[0, 5:12], after[0, 5:12]) and not np.allclose(before[1, :9], after[1, :9])
    # without the segments the later documents do see it
    assert not np.allclose(plain(model, tokens)[0, 12:], plain(model, changed)[0, 12:])


def test_a_packed_document_gets_the_logits_it_gets_alone(tiny):
    model = _model(tiny())
    tokens = _tokens((2, 16))
    packed = forward(model, tokens, SEGMENTS, POSITIONS)
    # documents that start in this window, each at the start of a window of its own (then anything)
    for row, lo, hi in [(0, 5, 12), (0, 12, 16), (1, 9, 16)]:
        alone = np.concatenate([tokens[row, lo:hi], _tokens(16 - (hi - lo), seed=row + lo)])[None]
        np.testing.assert_allclose(packed[row, lo:hi], plain(model, alone)[0, :hi - lo], **ROUNDING)
    # the one begun earlier: alone at its positions 3..7, with no document before it
    alone = np.concatenate([tokens[0, :5], _tokens(11, seed=9)])[None]
    pos = np.concatenate([POSITIONS[0, :5], np.arange(8, 19, dtype=np.int32)])[None]
    np.testing.assert_allclose(packed[0, :5], forward(model, alone, None, pos)[0, :5], **ROUNDING)


def test_one_document_of_consecutive_positions_is_the_unpacked_model(tiny):
    model = _model(tiny())
    tokens = _tokens((2, 16))
    arange = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
    np.testing.assert_allclose(forward(model, tokens, np.ones_like(tokens), arange), plain(model, tokens), **ROUNDING)
    # positions alone take the same path as today's rotary: the same bits
    np.testing.assert_array_equal(nnx.jit(lambda m, t, p: m(t, positions_BxT=p))(model, tokens, arange),
                                  plain(model, tokens))
    batch = {"tokens": _tokens((2, 17)), "segments": np.ones((2, 17), np.int32),
             "positions": np.broadcast_to(np.arange(17, dtype=np.int32), (2, 17))}
    np.testing.assert_allclose(nnx.jit(lm_loss)(model, batch), nnx.jit(lm_loss)(model, {"tokens": batch["tokens"]}),
                               rtol=1e-6)


def test_no_gradient_reaches_another_documents_tokens(tiny):
    """Doc A's logits, differentiated through the embedding table: the rows of doc B's token ids (none of
    which occur in A) get exactly zero, though B comes first in the window."""
    model = _model(tiny())
    tokens = np.concatenate([_tokens((1, 7), low=128), _tokens((1, 9), seed=1, high=128)], axis=1)
    segments = np.array([[1] * 7 + [2] * 9], np.int32)
    positions = np.array([[*range(7), *range(9)]], np.int32)

    def doc_a(m, segments):
        logits = m(tokens, segments, positions) if segments is not None else m(tokens)
        return jnp.sum(jax.nn.log_softmax(logits[:, 7:]) ** 2)

    rows = lambda seg: np.asarray(nnx.jit(nnx.grad(doc_a))(model, seg)["embed"][...])
    masked, unmasked = rows(segments), rows(None)
    np.testing.assert_array_equal(masked[128:], 0)
    assert np.all(np.abs(masked[np.unique(tokens[0, 7:])]).sum(-1) > 0)
    assert np.abs(unmasked[np.unique(tokens[0, :7])]).sum() > 0  # without the mask doc B's rows do get some


def _on_mesh(cfg, mesh, batch, grads=False):
    """(logits of batch[:, :-1], lm_loss, and with grads its gathered gradients) of cfg's model built on mesh."""
    rules = cfg.mesh.logical_rules
    model = build_model(model_fn(cfg, mesh), mesh, rules)
    with jax.set_mesh(mesh):
        placed = {k: jax.device_put(v, NamedSharding(mesh, shd.batch_spec(rules, 2))) for k, v in batch.items()}
        cut = {k: v[:, :-1] for k, v in placed.items()}
        logits = nnx.jit(lambda m, b: m(b["tokens"], b["segments"], b["positions"]))(model, cut)
        if grads:
            loss, g = nnx.jit(nnx.value_and_grad(lm_loss))(model, placed)
            return np.asarray(logits), float(loss), shd.gather(nnx.to_pure_dict(g))
        return np.asarray(logits), float(nnx.jit(lm_loss)(model, placed)), None


def _devices(n):
    return jax.devices()[:n]


def test_packed_logits_and_loss_on_the_mesh_equal_one_devices():
    cfg = tiny_config()
    batch = packed_batch(8, 17)
    ref = _on_mesh(cfg, make_mesh(1, 1, 1, devices=_devices(1)), batch)
    found = _on_mesh(cfg, make_mesh(2, 2, 2), batch)
    np.testing.assert_allclose(found[0], ref[0], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(found[1], ref[1], rtol=2e-6)
    assert abs(ref[1] - float(nnx.jit(lm_loss)(_model(cfg), {"tokens": batch["tokens"]}))) > 1e-3  # the mask counts


@pytest.mark.parametrize("schedule", [["pipeline.microbatches=2"],
                                      pytest.param(["pipeline.microbatches=4", "pipeline.repeats=2"],
                                                   marks=pytest.mark.slow)], ids=["gpipe", "circular"])
def test_pipelined_packed_loss_and_gradients_equal_one_stages(schedule):
    cfg = tiny_config("model.n_layers=4", *schedule)
    batch = packed_batch(8, 17, seed=3)
    ref = _on_mesh(cfg, make_mesh(1, 1, 1, devices=_devices(1)), batch, grads=True)
    found = _on_mesh(cfg, make_mesh(1, 1, 1, stage=2, devices=_devices(2)), batch, grads=True)
    # as tests/test_pipeline.py: float32, the same math over micro-batches
    np.testing.assert_allclose(found[1], ref[1], rtol=2e-6)
    np.testing.assert_allclose(found[0], ref[0], rtol=2e-6, atol=2e-6)
    for a, b in zip(jax.tree.leaves(found[2]), jax.tree.leaves(ref[2])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # a batch the micro-batches do not divide (padded rows): the side inputs pad along
    odd = {k: v[:3] for k, v in batch.items()}
    np.testing.assert_allclose(_on_mesh(cfg, make_mesh(1, 1, 1, stage=2, devices=_devices(2)), odd)[0], ref[0][:3],
                               rtol=2e-6, atol=2e-6)


def test_mistakes_raise_one_line(tiny):
    model = _model(tiny())
    with pytest.raises(UserError, match=r"batch\['segments'\] has shape \(2, 15\), the tokens \(2, 16\)"):
        model(_tokens((2, 16)), np.ones((2, 15), np.int32))
    cudnn = _model(tiny("model.attention=cudnn", "model.dtype=bfloat16"))  # traced only: no GPU here
    tokens = _tokens((2, 15))
    with pytest.raises(UserError, match=r"model.attention=cudnn .* even sequence length .* got 15"):
        jax.eval_shape(lambda: cudnn(tokens, np.ones_like(tokens), None))

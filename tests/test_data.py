"""Corpus, held-out split, grain windows and loader determinism, global batch assembly."""
import jax
import numpy as np
import pytest

from jaxinfra.core.errors import UserError
from jaxinfra.data import sources as data
from jaxinfra.data import cache as cache_lib
from jaxinfra.data import corpus as corpus_lib
from jaxinfra.data import packing
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.sections import DEFAULT_RULES, DataConfig


def _load(cache, path="", glob="*.py", heldout_percent=1.0, tokenizer="bytes"):
    """The LM job's corpus of a data section, tokenized into `cache`."""
    data = DataConfig(path=path, glob=glob, heldout_percent=heldout_percent)
    return corpus_lib.load_corpus(data, tok_lib.load(tokenizer), str(cache))


def _folder(tmp_path, n=200):
    for i in range(n):
        (tmp_path / f"f{i:03d}.txt").write_text(f"file {i}\n" * (i % 7 + 3))
    (tmp_path / "skip.bin").write_bytes(b"\x00" * 10)
    return str(tmp_path)


def test_heldout_is_deterministic_by_path_and_about_one_percent():
    names = [f"pkg/mod{i}.py" for i in range(20000)]
    held = [n for n in names if cache_lib.is_heldout(n, 1.0)]
    assert 0.008 < len(held) / len(names) < 0.012
    assert held == [n for n in names if cache_lib.is_heldout(n, 1.0)]


def test_stdlib_corpus_split(tmp_path):
    corpus = _load(tmp_path)
    assert corpus.train.tokens.size > 20_000_000 and corpus.heldout.tokens.size == corpus.heldout.n_bytes == 297_251
    assert 0.005 < corpus.n_heldout_docs / (corpus.n_train_docs + corpus.n_heldout_docs) < 0.02
    assert corpus.train.tokens.dtype == np.uint8 and corpus.heldout_text == corpus.heldout.tokens.tobytes()


def test_folder_and_single_file_corpora(tmp_path):
    path = _folder(tmp_path)
    corpus = _load(tmp_path / "c1", path, "*.txt", heldout_percent=10)
    assert corpus.n_train_docs + corpus.n_heldout_docs == 200 and corpus.n_heldout_docs > 5
    one = _load(tmp_path / "c2", str(tmp_path / "f199.txt"), heldout_percent=10)
    # one file: its tail is held out, as the byte corpus always did
    raw = (tmp_path / "f199.txt").read_bytes()
    assert one.train.tokens[0:one.train.tokens.size].tobytes() + one.heldout_text == raw


def test_missing_and_empty_corpora(tmp_path):
    with pytest.raises(UserError, match="data.path=.*no such"):
        _load(tmp_path, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no files matching data.glob"):
        _load(tmp_path, str(tmp_path / "empty"), "*.txt")
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        _load(tmp_path, str(tmp_path / "empty"), "*.txt")
    corpus = _load(tmp_path, _folder(tmp_path, 3), "*.txt")
    with pytest.raises(UserError, match="data.batch_size=64 windows of model.seq_len=128"):
        corpus_lib.check_corpus(corpus, 128, 64, 1)


def test_windows_and_loader_are_deterministic_from_the_seed():
    tokens = np.arange(10_000, dtype=np.int64) % 251
    src = packing.Windows(tokens.astype(np.uint8), 16, "t")
    assert len(src) == (10_000 - 1) // 16
    np.testing.assert_array_equal(src[3]["tokens"], tokens[48:65])
    first = [next(iter(data.train_batches(src, 8, seed=s)))["tokens"] for s in (0, 0, 1)]
    assert first[0].shape == (8, 17) and first[0].dtype == np.int32
    np.testing.assert_array_equal(first[0], first[1])
    assert not np.array_equal(first[0], first[2])


def test_global_order_is_independent_of_the_process_count():
    tokens = np.random.default_rng(0).integers(0, 256, 5_000).astype(np.uint8)
    src = packing.Windows(tokens, 8, "t")  # 624 distinct windows: 60 batches of 12 wrap an epoch
    one = data.train_batches(src, 12, seed=3, process_index=0, process_count=1)
    whole = [b["tokens"] for b, _ in zip(one, range(60))]
    for P in (2, 3, 4):
        parts = [[b["tokens"] for b, _ in zip(data.train_batches(src, 12, 3, process_index=p, process_count=P),
                                             range(60))] for p in range(P)]
        for g in range(60):
            np.testing.assert_array_equal(np.concatenate([parts[p][g] for p in range(P)]), whole[g])
    resumed = data.train_batches(src, 12, seed=3, start=57, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(iter(resumed))["tokens"], whole[57])
    seen = np.concatenate(whole[:52])  # the first 624 windows: one epoch, each window once
    assert len({row.tobytes() for row in seen}) == 624


def test_global_batches_are_sharded_over_batch_axes():
    mesh = make_mesh(2, 2, 2)
    rules = {k: tuple(v) for k, v in DEFAULT_RULES.items()}
    sh = jax.sharding.NamedSharding(mesh, shd.batch_spec(rules, 2))
    local = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    (g,) = list(data.global_batches(iter([local]), sh))
    assert g["tokens"].shape == (8, 5) and g["tokens"].addressable_shards[0].data.shape == (2, 5)
    np.testing.assert_array_equal(shd.gather(g)["tokens"], local["tokens"])
    sh3 = jax.sharding.NamedSharding(mesh, shd.batch_spec(rules, 3, leading=1))
    (g3,) = list(data.global_batches(iter([local]), sh3, accum=2))
    np.testing.assert_array_equal(shd.gather(g3)["tokens"], local["tokens"].reshape(2, 4, 5))


def test_eval_windows_fixed_and_compression_yardsticks():
    tokens = np.frombuffer(b"def f(x):\n    return x\n" * 200, np.uint8)
    a = packing.eval_windows(tokens, 32, 8, 2)
    assert len(a) == 2 and a[0]["tokens"].shape == (8, 33)
    np.testing.assert_array_equal(a[1]["tokens"], packing.eval_windows(tokens, 32, 8, 2)[1]["tokens"])
    bpb = corpus_lib.compression_bpb(tokens)
    assert 0 < bpb["xz_bpb"] < 8 and 0 < bpb["zlib_bpb"] < 8


def test_any_random_access_source_keeps_the_seeded_global_order():
    import grain
    examples = [{"x": np.full(3, i, np.float32), "y": np.int32(i)} for i in range(40)]
    whole = [b for b, _ in zip(data.train_batches(examples, 8, seed=5, process_index=0, process_count=1), range(10))]
    assert whole[0]["x"].shape == (8, 3) and whole[0]["y"].dtype == np.int32
    assert sorted(np.concatenate([b["y"] for b in whole[:5]]).tolist()) == list(range(40))  # an epoch: each once
    as_grain = grain.MapDataset.source(examples)
    halves = [[b for b, _ in zip(data.train_batches(as_grain, 8, 5, process_index=p, process_count=2), range(10))]
              for p in range(2)]
    for g in range(10):  # process p reads rows [4p, 4p + 4) of every global batch, whatever the source type
        np.testing.assert_array_equal(np.concatenate([halves[0][g]["y"], halves[1][g]["y"]]), whole[g]["y"])
    with pytest.raises(UserError, match="train_source: expected a random-access source"):
        data.train_batches(iter(examples), 8, seed=0)
    # evaluation uses every example: a source shorter than a batch is one shorter batch, a remainder its own batch
    assert [len(b["y"]) for b in data.fixed_batches(examples, 64, 1)] == [40]
    assert [len(b["y"]) for b in data.fixed_batches(examples, 16, 4)] == [16, 16, 8]
    assert [len(b["y"]) for b in data.fixed_batches(examples, 16, 2)] == [16, 16]  # run.eval_batches caps it
    assert np.concatenate([b["y"] for b in data.fixed_batches(examples, 16, 4)]).tolist() == list(range(40))

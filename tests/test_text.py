"""Real text: the formats people keep documents in, tokenizers, the token cache, packed windows with document
fields, resume and process counts with a BPE tokenizer, and bad input as one line (exit 2)."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, need, tiny_config

from jaxinfra import cli
from jaxinfra.data import cache as cache_lib
from jaxinfra.data import corpus as corpus_lib
from jaxinfra.data import packing
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.lm import job
from jaxinfra.settings.sections import DataConfig

ROOT = Path(__file__).resolve().parents[1]


def _docs(n: int = 150) -> list[str]:
    """Documents of varied length: code, prose with accents and emoji, blank lines inside."""
    out = []
    for i in range(n):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # café ☕\n\n" for j in range(i % 9 + 1))
        out.append(f"# document {i}: naïve résumé 🐍\n" + body)
    return out


def _write(folder: Path, docs: list[str]) -> dict[str, Path]:
    """The same documents as JSONL, JSONL.gz, JSONL.zst, Parquet and a folder of .txt files."""
    zstandard = need("zstandard", "the text extra: .jsonl.zst corpora")
    pq = need("pyarrow.parquet", "the text extra: Parquet corpora")
    pa = need("pyarrow", "the text extra: Parquet corpora")
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode()
    paths = {"jsonl": folder / "docs.jsonl", "gz": folder / "docs.jsonl.gz", "zst": folder / "docs.jsonl.zst",
             "parquet": folder / "docs.parquet", "txt": folder / "txt"}
    paths["jsonl"].write_bytes(lines)
    paths["gz"].write_bytes(gzip.compress(lines))
    paths["zst"].write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), paths["parquet"], row_group_size=40)
    paths["txt"].mkdir(exist_ok=True)
    for i, d in enumerate(docs):
        (paths["txt"] / f"doc{i:04d}.txt").write_text(d)
    return paths


def _corpus(path: Path, tokenizer: tok_lib.Tokenizer, cache: Path, **kw) -> corpus_lib.Corpus:
    data = DataConfig(path=str(path), glob=kw.pop("glob", "*.txt"), **kw)
    return corpus_lib.load_corpus(data, tokenizer, str(cache))


def test_every_format_gives_the_same_tokens(tmp_path):
    docs = _docs()
    paths = _write(tmp_path / "data", docs)
    plan = corpus_lib.plan_of(DataConfig(path=str(paths["jsonl"]), heldout_percent=0))[1]
    bpe = tok_lib.train_bpe(corpus_lib.bpe_sample(plan, 0), 400)
    for tokenizer in (tok_lib.load("bytes"), bpe):
        got = {name: _corpus(p, tokenizer, tmp_path / "cache", heldout_percent=0) for name, p in paths.items()}
        want = got.pop("jsonl")
        assert want.n_train_docs == len(docs) and want.train.n_bytes == sum(len(d.encode()) for d in docs)
        stream = want.train.tokens[0:want.train.tokens.size]
        for name, c in got.items():
            np.testing.assert_array_equal(c.train.tokens[0:c.train.tokens.size], stream, err_msg=name)
            np.testing.assert_array_equal(c.train.starts, want.train.starts, err_msg=name)
        if tokenizer.eot is not None:  # each document begins with end-of-text, then its own tokens
            assert (stream[want.train.starts] == tokenizer.eot).all() and (stream == tokenizer.eot).sum() == len(docs)
            first = stream[want.train.starts[0] + 1:want.train.starts[1]]
            assert tokenizer.decode(first) == docs[0]
        else:
            assert stream.tobytes() == "".join(docs).encode()


def test_rows_are_held_out_by_path_and_row_and_heldout_path_replaces_the_split(tmp_path):
    docs = _docs(400)
    paths = _write(tmp_path / "data", docs)
    c = _corpus(paths["jsonl"], tok_lib.load("bytes"), tmp_path / "cache", heldout_percent=10)
    held = [i for i in range(len(docs)) if cache_lib.is_heldout(f"docs.jsonl:{i}", 10)]
    assert c.n_heldout_docs == len(held) > 10 and c.heldout_text == "".join(docs[i] for i in held).encode()
    assert c.heldout.n_bytes == len(c.heldout_text) and c.train.n_bytes + c.heldout.n_bytes == len("".join(docs).encode())
    own = _corpus(paths["jsonl"], tok_lib.load("bytes"), tmp_path / "cache", heldout_path=str(paths["txt"]))
    assert own.n_train_docs == len(docs) and own.n_heldout_docs == len(docs)


def test_a_trained_bpe_is_the_same_in_two_runs_and_two_processes(tmp_path):
    paths = _write(tmp_path / "data", _docs())
    plan = corpus_lib.plan_of(DataConfig(path=str(paths["txt"]), glob="*.txt"))[1]
    first = tok_lib.train_bpe(corpus_lib.bpe_sample(plan, 20_000), 500)
    again = tok_lib.train_bpe(corpus_lib.bpe_sample(plan, 20_000), 500)
    code = ("import sys; from jaxinfra.data import corpus as c, tokenizer as t; "
            "from jaxinfra.settings.sections import DataConfig; "
            "plan = c.plan_of(DataConfig(path=sys.argv[1], glob='*.txt'))[1]; "
            "sys.stdout.write(t.train_bpe(c.bpe_sample(plan, 20_000), 500).json_text)")
    other = subprocess.run([sys.executable, "-c", code, str(paths["txt"])], capture_output=True, text=True,
                           check=True, env=dict(os.environ, PYTHONHASHSEED="123")).stdout
    assert 400 < first.vocab_size <= 500 and first.eot == 0  # this small corpus has fewer pairs to merge
    assert first.json_text == again.json_text == other
    sample = list(corpus_lib.bpe_sample(plan, 20_000))
    assert 15_000 < sum(map(len, sample)) <= 20_000 and sample == list(corpus_lib.bpe_sample(plan, 20_000))


def test_the_cache_is_reused_and_keyed_by_the_files_and_the_tokenizer(tmp_path, caplog):
    paths = _write(tmp_path / "data", _docs())
    bytes_tok = tok_lib.load("bytes")
    a = _corpus(paths["txt"], bytes_tok, tmp_path / "cache", heldout_percent=5)
    caplog.set_level("INFO")
    b = _corpus(paths["txt"], bytes_tok, tmp_path / "cache", heldout_percent=5)
    assert a.folder == b.folder and "reused" in caplog.text
    plan = corpus_lib.plan_of(DataConfig(path=str(paths["txt"]), glob="*.txt"))[1]
    c = _corpus(paths["txt"], tok_lib.train_bpe(corpus_lib.bpe_sample(plan, 0), 300), tmp_path / "cache",
                heldout_percent=5)
    assert c.folder != a.folder
    (paths["txt"] / "doc0003.txt").write_text("changed\n")
    d = _corpus(paths["txt"], bytes_tok, tmp_path / "cache", heldout_percent=5)
    assert d.folder not in (a.folder, c.folder) and b"changed\n" in d.train.tokens[0:d.train.tokens.size].tobytes()
    assert not [p for p in os.listdir(tmp_path / "cache") if p.endswith(".partial")]


def test_windows_carry_segments_and_positions_that_restart_at_each_document():
    tokens = np.arange(40, dtype=np.uint16)
    starts = np.array([0, 5, 9, 10, 30], np.int64)
    w = packing.Windows(tokens, 8, "t", starts)
    ex = w[1]  # tokens 8..16: the end of document 1 (5..8), document 2 (9), document 3 (10..29)
    np.testing.assert_array_equal(ex["tokens"], np.arange(8, 17))
    np.testing.assert_array_equal(ex["segments"], [1, 2, 3, 3, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(ex["positions"], [0, 0, 0, 1, 2, 3, 4, 5, 6])
    assert set(packing.Windows(tokens, 8, "t")[1]) == {"tokens"}


def test_eval_bits_per_byte_weigh_each_token_by_its_bytes():
    bpe = tok_lib.train_bpe([d.encode() for d in _docs(40)], 300)
    text = _docs(41)[40]
    ids = bpe.encode(text)
    assert int(bpe.token_bytes()[ids].sum()) == len(text.encode()) and bpe.token_bytes()[bpe.eot] == 0

    class Uniform:  # logits of zeros: every target costs ln(vocab) nats
        def __call__(self, tokens_BxT, *fields):
            return jnp.zeros(tokens_BxT.shape + (300,), jnp.float32)

    batch = {"tokens": jnp.asarray([ids[:33]], jnp.int32)}
    out = job.LMEval(bpe.token_bytes())(Uniform(), batch)
    n_bytes = int(bpe.token_bytes()[ids[1:33]].sum())
    np.testing.assert_allclose(float(out["bpb"]), 32 * np.log2(300) / n_bytes, rtol=1e-6)


BAD = {
    "malformed": ('{"text": "a"}\n{"text": oops}\n', "line 2"),
    "missing key": ('{"body": "a"}\n', "'body'"),
    "not a string": ('{"text": 5}\n', "number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_jsonl_file_is_one_line_and_exit_2(case, tmp_path, capsys):
    content, word = BAD[case]
    (tmp_path / "bad.jsonl").write_text(content)
    code = cli.main([*TINY, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'bad.jsonl'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "bad.jsonl" in err[0] and word in err[0], err


def test_bad_tokenizers_columns_and_vocabularies_are_one_line_and_exit_2(tmp_path, capsys):
    pq = need("pyarrow.parquet", "the text extra: Parquet corpora")
    pa = need("pyarrow", "the text extra: Parquet corpora")
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "t.parquet")
    (tmp_path / "broken.json").write_text('{"model": 3}')
    (tmp_path / "empty.jsonl").write_text("\n\n")
    paths = _write(tmp_path / "data", _docs(60))
    tok = tok_lib.train_bpe([d.encode() for d in _docs(60)], 300)
    (tmp_path / "tok.json").write_text(tok.json_text)
    cases = [([f"data.path={tmp_path / 't.parquet'}"], ["t.parquet", "body"]),
             ([f"data.path={paths['txt']}", "data.glob=*.txt", f"data.tokenizer={tmp_path / 'broken.json'}"],
              ["data.tokenizer", "broken.json"]),
             ([f"data.path={tmp_path / 'empty.jsonl'}"], ["empty"]),
             ([f"data.path={paths['txt']}", "data.glob=*.txt", f"data.tokenizer={tmp_path / 'tok.json'}",
               "model.vocab_size=256"], ["model.vocab_size=256", "300"]),
             (["data.tokenizer=bpe:1024", "model.vocab_size=512"], ["model.vocab_size=512", "1024"]),
             (["data.tokenizer=bpe:100"], ["bpe:100", "258"]),
             (["data.packing=docs"], ["data.packing", "documents"])]
    for args, words in cases:
        code = cli.main([*TINY, f"run.dir={tmp_path / 'run'}", *args])
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and all(w in lines[0] for w in words), (args, lines)
        assert "compiled" not in out.out


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


TEXT = ["data.tokenizer=bpe:300", "data.packing=documents", "data.heldout_percent=10", "run.log_every=1",
        "checkpoint.every=5", "checkpoint.export_final=false"]


@pytest.mark.slow
def test_bpe_and_packed_documents_resume_bit_for_bit(tmp_path):
    paths = _write(tmp_path / "data", _docs(300))
    args = [*TEXT, f"data.path={paths['zst']}", "run.steps=20"]
    straight = job.run(tiny_config(*args, f"run.dir={tmp_path / 'straight'}"))
    job.run(tiny_config(*args, f"run.dir={tmp_path / 'split'}", "run.stop_after=10"))
    resumed = job.run(tiny_config(*args, f"run.dir={tmp_path / 'split'}"))
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(a) == 20 and a == b, (a, b)
    assert straight["eval_bpb"] == resumed["eval_bpb"]
    # the resumed run read the tokenizer it trained, not a new one
    assert (tmp_path / "split" / "tokenizer.json").read_text() == (tmp_path / "straight" / "tokenizer.json").read_text()


@pytest.mark.slow
def test_two_processes_equal_one_with_bpe_and_packing(tmp_path):
    paths = _write(tmp_path / "data", _docs(300))
    args = [*TINY, *TEXT, f"data.path={paths['txt']}", "data.glob=*.txt", "run.steps=5", "run.eval_batches=0"]
    env = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, PYTHON=sys.executable)
    runs = {"one": [sys.executable, str(ROOT / "scripts" / "train.py")],
            "two": [str(ROOT / "scripts" / "launch_local.sh"), "2"]}
    for name, cmd in runs.items():
        for _ in range(3):  # a coordinator port another test holds: try again
            out = subprocess.run([*cmd, *args, f"run.dir={tmp_path / name}"], capture_output=True, text=True,
                                 cwd=ROOT, env=env, timeout=400)
            if "Failed to add port" not in out.stderr:
                break
        assert out.returncode == 0, out.stderr[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == 5
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=2e-6)
    meta = [json.loads(p.read_text()) for p in (tmp_path / "two" / "cache").glob("tokens-*/meta.json")]
    assert [m["parts"] for m in meta] == [2]  # each process tokenized its share of the files


@pytest.mark.slow
def test_a_1gb_jsonl_file_is_tokenized_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    line = (json.dumps({"text": "x = 1  # " + "lorem ipsum dolor sit amet " * 36}) + "\n").encode()
    block = line * ((8 << 20) // len(line))
    with open(path, "wb") as f:
        while f.tell() < (1 << 30) + 1:
            f.write(block)
    # VmHWM, the peak of this process's own memory: ru_maxrss survives exec, so a child of pytest would start
    # from pytest's peak and hide its own
    code = ("import re, sys; from jaxinfra.data import corpus as c, tokenizer as t; "
            "from jaxinfra.settings.sections import DataConfig; "
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
            "base = hwm(); "
            "got = c.load_corpus(DataConfig(path=sys.argv[1]), t.load('bytes'), sys.argv[2]); "
            "print(got.train.n_bytes + got.heldout.n_bytes, base, hwm())")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "cache")], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    n_bytes, base_kb, peak_kb = map(int, out.stdout.split())
    path.unlink()
    assert n_bytes > 1_000_000_000
    assert (peak_kb - base_kb) * 1024 < 1 << 30, (base_kb, peak_kb)


def test_a_run_keeps_its_tokenizer_and_init_from_reuses_it(tmp_path, capsys):
    paths = _write(tmp_path / "data", _docs(200))
    args = [*TINY, "data.tokenizer=bpe:300", f"data.path={paths['jsonl']}", "data.heldout_percent=10",
            "run.steps=2", "checkpoint.export_final=false", "checkpoint.every=2"]
    assert cli.main([*args, f"run.dir={tmp_path / 'a'}"]) == 0
    trained = (tmp_path / "a" / "tokenizer.json").read_text()
    # a fresh run that starts from run a reads a's tokenizer instead of training its own (its sample differs)
    assert cli.main([*args, "data.tokenizer_sample=5000", f"checkpoint.init_from={tmp_path / 'a'}",
                     f"run.dir={tmp_path / 'b'}"]) == 0
    assert (tmp_path / "b" / "tokenizer.json").read_text() == trained
    capsys.readouterr()
    # resuming run a with another tokenizer is refused in one line
    code = cli.main([*args, "data.tokenizer=bytes", "run.steps=4", f"run.dir={tmp_path / 'a'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.tokenizer=bpe:300" in err[0], err


@pytest.mark.slow
def test_a_bad_file_in_one_process_share_stops_both_processes_with_one_line(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(_docs(40)):  # the last file, in the second process's share, has a broken line
        (folder / f"part{i:02d}.jsonl").write_text(json.dumps({"text": d}) + "\n" + ("{oops\n" if i == 39 else ""))
    env = dict({k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, PYTHON=sys.executable)
    for _ in range(3):  # a coordinator port another test holds: try again
        out = subprocess.run([str(ROOT / "scripts" / "launch_local.sh"), "2", *TINY, f"data.path={folder}",
                              "data.glob=*.jsonl", f"run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                             cwd=ROOT, env=env, timeout=300)
        if "Failed to add port" not in out.stderr:
            break
    assert out.returncode == 2, out.stderr[-3000:]
    assert "part39.jsonl line 2" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]

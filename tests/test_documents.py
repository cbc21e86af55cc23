"""Streamed documents of a text corpus: JSONL (plain, .gz, .zst), Parquet and plain files, local and on s3://, read back
byte for byte; every bad input a one-line UserError naming the file; a 1 GiB file streamed in bounded memory."""
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.data import documents as docs_lib

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["plain ascii", "", "two\nlines\r\n and a tab\t", "unicode: é ß 中文 ﷽ 😀👩‍👩‍👧 \u200b",
         "quotes \" and \\ backslash", "x" * 300_000, *[f"doc {i} " * (i % 13 + 1) for i in range(40)]]
EXPECTED = [(i, t.encode()) for i, t in enumerate(TEXTS)]


def _jsonl(texts: list[str], ensure_ascii: bool = False) -> bytes:
    """One JSON object a line, with an extra key and a blank line after the first (skipped, but counted)."""
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=ensure_ascii) for i, t in enumerate(texts)]
    return ("\n".join(lines[:1] + ["   "] + lines[1:]) + "\n").encode()


def _write_all(folder: Path) -> dict[str, Path]:
    """The same documents as JSONL, JSONL.gz, JSONL.zst (two frames), Parquet and a folder of .txt files."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = _jsonl(TEXTS)
    out = {"jsonl": folder / "c.jsonl", "gz": folder / "c.jsonl.gz", "zst": folder / "c.jsonl.zst",
           "parquet": folder / "c.parquet"}
    out["jsonl"].write_bytes(raw)
    out["gz"].write_bytes(gzip.compress(raw))
    cut = raw.index(b"\n", len(raw) // 2) + 1  # two zstd frames, as zstd -c a b or a parallel compressor writes
    out["zst"].write_bytes(zstandard.ZstdCompressor().compress(raw[:cut]) + zstandard.ZstdCompressor().compress(raw[cut:]))
    pq.write_table(pa.table({"id": list(range(len(TEXTS))), "text": TEXTS}), out["parquet"], row_group_size=7)
    (folder / "txt").mkdir(exist_ok=True)
    for i, t in enumerate(TEXTS):
        (folder / "txt" / f"d{i:03d}.txt").write_bytes(t.encode())
    return out


def _read(f: docs_lib.DocFile, key: str = "text") -> list[tuple[int, bytes]]:
    return list(docs_lib.documents(f, key))


def _one(path: Path) -> docs_lib.DocFile:
    return docs_lib.list_files(str(path), "*")[1][0]


def test_every_format_reads_back_the_same_rows_and_bytes(tmp_path):
    files = _write_all(tmp_path)
    for kind, path in files.items():
        f = _one(path)
        assert f.rows and f.rel == path.name and f.size == path.stat().st_size, kind
        assert _read(f) == EXPECTED, kind
    name, txt = docs_lib.list_files(str(tmp_path / "txt"), "*.txt")
    assert name == str(tmp_path / "txt") and [f.rel for f in txt] == [f"d{i:03d}.txt" for i in range(len(TEXTS))]
    assert not any(f.rows for f in txt)
    assert [_read(f) for f in txt] == [[(0, t)] for _, t in EXPECTED]
    # .json, .txt.gz: one document each (the .gz decompressed), bytes as they are
    (tmp_path / "one.json").write_bytes(b'{"text": "not rows"}\n')
    (tmp_path / "one.txt.gz").write_bytes(gzip.compress(b"gz text"))
    assert _read(_one(tmp_path / "one.json")) == [(0, b'{"text": "not rows"}\n')]
    assert _read(_one(tmp_path / "one.txt.gz")) == [(0, b"gz text")]


def test_unicode_escaped_or_not_and_invalid_utf8_come_through_as_bytes(tmp_path):
    (tmp_path / "esc.jsonl").write_bytes(_jsonl(TEXTS, ensure_ascii=True))  # \ud83d\ude00 pairs and \u00e9
    assert _read(_one(tmp_path / "esc.jsonl")) == EXPECTED
    # raw invalid bytes inside a JSON string, and a lone surrogate escape (half an emoji), in every container
    raw = b'{"text": "ok \xff\xfe bad \xc3( end"}\n{"text": "half \\ud83d emoji"}\n{"text": "\xe2\x82"}\n'
    want = [(0, b"ok \xff\xfe bad \xc3( end"), (1, b"half \xed\xa0\xbd emoji"), (2, b"\xe2\x82")]
    (tmp_path / "bad.jsonl").write_bytes(raw)
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + raw)  # a byte-order mark before the first line
    for name in ("bad.jsonl", "bad.jsonl.gz", "bad.jsonl.zst", "bom.jsonl"):
        assert _read(_one(tmp_path / name)) == want, name
    (tmp_path / "bad.txt").write_bytes(b"\xff\x00\xc3(")
    assert _read(_one(tmp_path / "bad.txt")) == [(0, b"\xff\x00\xc3(")]


def _raises(f: docs_lib.DocFile, *says: str, key: str = "text") -> str:
    with pytest.raises(UserError) as e:
        _read(f, key)
    msg = str(e.value)
    assert "\n" not in msg and f.uri in msg, msg
    for s in says:
        assert s in msg, (s, msg)
    return msg


def test_each_bad_input_is_one_line_naming_the_file_and_where(tmp_path):
    def put(name: str, data: bytes) -> docs_lib.DocFile:
        (tmp_path / name).write_bytes(data)
        return _one(tmp_path / name)

    ok = b'{"text": "a"}\n\n'  # a blank line still counts: the bad line below is line 3
    _raises(put("m.jsonl", ok + b'{"text": "b",}\n'), "line 3", "malformed JSON", "column")
    _raises(put("a.jsonl", ok + b'["text"]\n'), "line 3", "JSON array", "data.text_key='text'")
    keys = {f"k{i}": i for i in range(11)}
    msg = _raises(put("k.jsonl", ok + json.dumps(keys).encode() + b"\n"), "line 3", "no key data.text_key='text'",
                  "'k0', 'k1'", "'k7'", "and 3 more")
    assert "'k8'" not in msg
    _raises(put("n.jsonl", ok + b'{"text": 7}\n'), "line 3", "holds a JSON number")
    _raises(put("z.jsonl", ok + b'{"text": null}\n'), "line 3", "holds a JSON null")
    _raises(put("o.jsonl", b'{"body": "x"}\n'), "line 1", "'body'", key="content")

    pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp_path / "col.parquet")
    _raises(_one(tmp_path / "col.parquet"), "no column data.text_key='text'", "'body', 'id'")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "int.parquet")
    _raises(_one(tmp_path / "int.parquet"), "holds int64, not strings")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    _raises(_one(tmp_path / "null.parquet"), "row 1", "is null")

    raw = _jsonl(TEXTS)
    gz, zst = gzip.compress(raw), zstandard.ZstdCompressor().compress(raw)
    _raises(put("g1.jsonl.gz", b"not gzip at all"), "corrupt gzip stream")
    _raises(put("g2.jsonl.gz", gz[:len(gz) // 2]), "corrupt gzip stream")  # truncated
    _raises(put("g3.jsonl.gz", gz[:-8] + b"\0" * 8), "corrupt gzip stream")  # CRC and length damaged
    _raises(put("g4.txt.gz", gz[:100]), "corrupt gzip stream")
    _raises(put("s1.jsonl.zst", b"not zstd at all"), "corrupt zstd stream")
    _raises(put("s2.jsonl.zst", zst[:len(zst) // 2]), "corrupt zstd stream", "truncated")  # zstandard's own reader
    _raises(put("s3.jsonl.zst", zst + zst[:40]), "corrupt zstd stream", "truncated")  # ends quietly on these two
    good = (tmp_path / "c.parquet")
    pq.write_table(pa.table({"text": TEXTS}), good, row_group_size=5)
    data = good.read_bytes()
    _raises(put("p1.parquet", b""), "not a readable Parquet file")
    _raises(put("p2.parquet", data[:len(data) // 2]), "not a readable Parquet file")
    _raises(put("p3.parquet", data[:len(data) // 2] + b"\x07" * 4096 + data[len(data) // 2 + 4096:]),
            "corrupt Parquet data")


def test_missing_text_extra_names_it_and_the_file(tmp_path):
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n'))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "a"}\n')
    code = f"""
import sys
for m in ("pyarrow", "pyarrow.parquet", "zstandard"):
    sys.modules[m] = None  # as if not installed: their import raises ImportError
from jaxinfra.core.errors import UserError
from jaxinfra.data import documents
files = dict((f.rel, f) for f in documents.list_files({str(tmp_path)!r}, "*")[1])
print(list(documents.documents(files["a.jsonl"])))
for name in ("a.jsonl.zst", "a.parquet"):
    try:
        list(documents.documents(files[name]))
    except UserError as e:
        print(e)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "[(0, b'a')]" and len(lines) == 3, out.stdout
    for line, name, module in zip(lines[1:], ("a.jsonl.zst", "a.parquet"), ("zstandard", "pyarrow")):
        assert str(tmp_path / name) in line and module in line and "pip install 'jaxinfra[text]'" in line, line


def _tree(root: Path) -> None:
    for rel, data in {"a.jsonl": b'{"text": "a"}\n', "sub/b.jsonl": b'{"text": "b"}\n{"text": "b2"}\n',
                      "sub/c.txt": b"c", "sub/deep/d.jsonl": b'{"text": "d"}\n', "e.md": b"# e"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_a_folder_is_listed_recursively_through_the_glob(tmp_path):
    _tree(tmp_path / "corpus")
    name, files = docs_lib.list_files(str(tmp_path / "corpus"), "*.jsonl")
    assert [f.rel for f in files] == ["a.jsonl", "sub/b.jsonl", "sub/deep/d.jsonl"]
    for f in files:
        st = os.stat(f.uri)
        assert (f.size, f.stamp) == (st.st_size, str(st.st_mtime_ns)) and f.uri == str(tmp_path / "corpus" / f.rel)
    assert [d for f in files for d in _read(f)] == [(0, b"a"), (0, b"b"), (1, b"b2"), (0, b"d")]
    assert [f.rel for f in docs_lib.list_files(str(tmp_path / "corpus"), "*")[1]] == \
        ["a.jsonl", "e.md", "sub/b.jsonl", "sub/c.txt", "sub/deep/d.jsonl"]
    assert [f.rel for f in docs_lib.list_files(str(tmp_path / "corpus" / "sub" / "b.jsonl"), "*.md")[1]] == ["b.jsonl"]
    for path, glob, says in [(tmp_path / "corpus", "*.parquet", "holds no files matching data.glob=*.parquet"),
                             (tmp_path / "nope", "*", "no such file or folder")]:
        with pytest.raises(UserError, match=re.escape(f"data.path={path}") + ".*" + re.escape(says)):
            docs_lib.list_files(str(path), glob)
    with pytest.raises(UserError, match="unknown storage scheme http://"):
        docs_lib.list_files("http://host/corpus", "*")


def test_the_default_corpus_is_the_standard_library_as_corpus_py_reads_it():
    name, files = docs_lib.list_files("", "*.txt")  # the glob does not apply to the standard library
    assert name == "stdlib" and len(files) > 1000 and all(f.rel.endswith(".py") and not f.rows for f in files)
    assert not any("site-packages" in f.rel.split("/") for f in files)
    assert [f.rel for f in files] == sorted(f.rel for f in files)
    assert _read(files[0]) == [(0, Path(files[0].uri).read_bytes())]


def test_a_corpus_on_s3_or_gs_reads_as_the_same_corpus_on_disk(tmp_path, store):
    """The same files through moto's S3 server and the GCS emulator: same rels, sizes and documents; stamps follow
    the content."""
    bucket = store
    local = tmp_path / "corpus"
    _write_all(local)
    _tree(local)
    for rel, _ in storage.walk_files(str(local)):
        storage.upload(str(local / rel), f"{bucket}/corpus/{rel}")
    for glob in ("*", "*.jsonl*", "d0[0-2]*.txt"):
        _, disk = docs_lib.list_files(str(local), glob)
        name, stored = docs_lib.list_files(f"{bucket}/corpus", glob)
        assert name == f"{bucket}/corpus" and [(f.rel, f.size) for f in stored] == [(f.rel, f.size) for f in disk]
        assert all(f.uri == f"{bucket}/corpus/{f.rel}" and f.stamp for f in stored)
        assert [_read(f) for f in stored] == [_read(f) for f in disk], glob
    one = f"{bucket}/corpus/c.jsonl.zst"
    _, [f] = docs_lib.list_files(one, "*.md")
    assert (f.rel, f.uri, f.size) == ("c.jsonl.zst", one, (local / "c.jsonl.zst").stat().st_size)
    assert _read(f) == EXPECTED
    # the stamp follows the content (the ETag); the listing and the single object agree
    listed = {g.rel: g.stamp for g in docs_lib.list_files(f"{bucket}/corpus", "*")[1]}
    assert listed["c.jsonl.zst"] == f.stamp
    storage.write_bytes(one, b"changed")
    assert docs_lib.list_files(one, "*")[1][0].stamp != f.stamp
    storage.upload(str(local / "c.parquet"), f"{bucket}/bad/x.jsonl.gz")
    _raises(_one_uri(f"{bucket}/bad/x.jsonl.gz"), "corrupt gzip stream")
    with pytest.raises(UserError, match=f"data.path={bucket}/none: no such file or folder"):
        docs_lib.list_files(f"{bucket}/none", "*")


def _one_uri(uri: str) -> docs_lib.DocFile:
    return docs_lib.list_files(uri, "*")[1][0]


GIB = 1 << 30
# The measuring process is started by a small one: Linux carries the peak RSS of the process that forks into the
# child's ru_maxrss across exec, so a child of pytest itself (JAX loaded, ~480 MiB) would start from pytest's peak.
_LAUNCH = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, *sys.argv[1:]]))"
_MEASURE = """
import json, resource, sys
from jaxinfra.data import documents
out = {}
for path in sys.argv[1:]:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; imports done, nothing read yet
    n = size = 0
    for row, text in documents.documents(documents.list_files(path, "*")[1][0]):
        n, size = n + 1, size + len(text)
    out[path] = {"docs": n, "bytes": size, "base_kib": base, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_1gib_jsonl_file_streams_in_bounded_memory(tmp_path):
    """1 GiB of JSONL (and the same as .jsonl.zst) read by documents() in a process whose peak RSS stays within
    1 GiB of its RSS after imports."""
    plain, zst = tmp_path / "big.jsonl", tmp_path / "big.jsonl.zst"
    rng = np.random.default_rng(0)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8)
    docs = size = text_bytes = 0
    try:
        with open(plain, "wb") as out, open(zst, "wb") as packed, \
                zstandard.ZstdCompressor(level=1).stream_writer(packed) as zout:
            while size < GIB:  # 16 MiB chunks of documents of 1 to 64 KiB
                chunk = letters[rng.integers(0, len(letters), 16 << 20)].tobytes().decode()
                cuts = np.cumsum(rng.integers(1 << 10, 64 << 10, len(chunk) // (1 << 10)))
                texts = [chunk[a:b] for a, b in zip(cuts[:-1], cuts[1:]) if b <= len(chunk)]
                data = ("\n".join(json.dumps({"text": t}) for t in texts) + "\n").encode()
                out.write(data)
                zout.write(data)
                docs, size, text_bytes = docs + len(texts), size + len(data), text_bytes + sum(map(len, texts))
        run = subprocess.run([sys.executable, "-c", _LAUNCH, "-c", _MEASURE, str(plain), str(zst)], cwd=ROOT,
                             capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stderr
        for path, got in json.loads(run.stdout).items():
            grew = (got["peak_kib"] - got["base_kib"]) << 10
            print(f"{Path(path).name}: {size / GIB:.2f} GiB of JSONL, {docs} documents: RSS after imports "
                  f"{got['base_kib'] >> 10} MiB, peak {got['peak_kib'] >> 10} MiB, growth {grew >> 20} MiB")
            assert (got["docs"], got["bytes"]) == (docs, text_bytes) and grew < GIB
    finally:
        plain.unlink(missing_ok=True)
        zst.unlink(missing_ok=True)

"""A hostile user's files and an unlucky operator's day: each defect of the reliability issue
reproduced, each a clear line and nothing lost."""
import contextlib
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
import tensorstore as ts
from conftest import TINY, tiny_config
from safetensors.numpy import save_file
from test_resume import _start, _wait_for_line
from test_user_model import BASE as NET
from test_user_model import Net, dataset, xent

import jaxinfra
from jaxinfra import cli
from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core.errors import Diverged, UserError
from jaxinfra.export import sparse
from jaxinfra.parallel import sharding as shd
from steps import mesh_of, model_plan


@contextlib.contextmanager
def _reaped(*procs):
    """The runs a test started, killed with their process groups on the way out, whatever happens
    (a failed assertion, a timeout): none outlives its test."""
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()  # reaped, pipes closed


# 5. YAML that expands without bound, or nests without bound, is one line, not a hang
def _laughs(levels=9):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nrun:\n  sample_prompts: *a{levels - 1}\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text, words", [
    (_laughs(), "expands to more than 100,000 values"),
    (_laughs().replace("run:\n  sample_prompts:", "mesh:\n  rules:\n    batch:"), "expands to more than"),
    ("run:\n  sample_prompts: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply to parse"),
    ("run:\n  sample_prompts: " + "[" * 40 + "]" * 40 + "\n", "nested more than 32 levels deep"),
])
def test_alias_bombs_and_deep_nesting_exit_2_at_once(tmp_path, capsys, text, words):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    assert len(text) < 20_000
    assert cli.main(["--config", str(path), f"run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and words in err[0], err
    assert cli.main(["run.sample_prompts=" + "[" * 3000 + "]" * 3000]) == 2
    assert "override run.sample_prompts: nested too deeply" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# 7. Inf in Adam's moments while the parameters stay finite: the run stops, nothing is saved
@pytest.mark.parametrize("every, words", [
    (0, r"gradient norm became inf at step 1 .*optim.clip_norm"),  # found in the step's metrics, one step late
    (1, r"parameters or optimizer state became NaN or Inf at step 1; not checkpointed"),  # found by the save
])
def test_inf_in_the_optimizer_state_stops_the_run_before_any_save(tmp_path, every, words):
    huge = lambda model, batch: 1e25 * xent(model, batch)  # grad norm overflows; Adam's nu becomes Inf
    cfg = tiny_config(*NET, f"run.dir={tmp_path}", "optim.clip_norm=0", f"checkpoint.every={every}",
                      "prune.sparsity=0")
    with pytest.raises(Diverged, match=words):
        jaxinfra.train_model(cfg, Net, huge, dataset())
    assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


# 9. A step whose metadata record is gone: the advice (checkpoint.fallback=true) works
def test_missing_metadata_record_falls_back_to_the_previous_step(tmp_path, capsys):
    args = [*NET, f"run.dir={tmp_path}", "checkpoint.every=3", "checkpoint.keep=3", "prune.sparsity=0"]
    jaxinfra.train_model(tiny_config(*args, "run.steps=6"), Net, xent, dataset())
    os.remove(tmp_path / "checkpoints" / "6" / "meta" / "metadata")
    capsys.readouterr()
    with pytest.raises(UserError, match=r"checkpoint step 6 is unreadable .*checkpoint.fallback=true"):
        jaxinfra.train_model(tiny_config(*args, "run.steps=8"), Net, xent, dataset())
    final = jaxinfra.train_model(tiny_config(*args, "run.steps=8", "checkpoint.fallback=true"), Net, xent, dataset())
    out = capsys.readouterr().out
    assert final["start_step"] == 3 and final["step"] == 8
    assert "step 6 is unreadable" in out and "resumed from step 3" in out


# 3. A finished run that died before its final export gets it on the next start
def test_restart_at_the_last_step_completes_what_the_run_owes(tmp_path, capsys):
    args = [*NET, f"run.dir={tmp_path}", "run.eval_batches=1", "prune.sparsity=0"]
    jaxinfra.train_model(tiny_config(*args, "checkpoint.export_final=false"), Net, xent, dataset(), dataset(64, 1))
    assert not (tmp_path / "exports").exists()  # as if killed after committing step 10, before exporting
    capsys.readouterr()
    final = jaxinfra.train_model(tiny_config(*args, "checkpoint.export_final=true"), Net, xent, dataset(),
                                 dataset(64, 1))
    out = capsys.readouterr().out
    assert final["start_step"] == 10 and "eval_loss" in final
    assert "completing the final evaluation and export" in out
    assert (tmp_path / "exports" / "model-10.safetensors").is_file()
    flat = jaxinfra.load_safetensors(str(tmp_path / "exports" / "model-10.safetensors"))
    assert sorted(flat) == ["b", "w1", "w2", "w3"]


# 2. One writer per run folder: a second run exits 2 naming the holder; a dead holder's lock is taken over
@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = _start([*TINY, f"run.dir={run_dir}", "run.steps=100000", "checkpoint.every=0", "run.log_every=1"])
    with _reaped(first):  # killed on the way out: dies holding the lock
        _wait_for_line(first, "train step compiled")
        lock = json.loads((run_dir / ".jaxinfra.lock").read_text())
        assert lock["pid"] == first.pid
        rc = cli.main([*TINY, f"run.dir={run_dir}", "run.steps=3", "optim.lr=1e-4"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert f"run.dir={run_dir} is in use by process {first.pid} on host {lock['host']}" in err[0]
        assert lock["since"] in err[0]
    rc = cli.main([*TINY, f"run.dir={run_dir}", "run.steps=2", "checkpoint.every=0"])
    out = capsys.readouterr().out
    assert rc == 0 and f"process {first.pid} on {lock['host']}" in out and "is gone" in out
    assert not (run_dir / ".jaxinfra.lock").exists()  # released at the end


@pytest.mark.slow
def test_two_writers_started_together_one_runs_one_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, f"run.dir={run_dir}", "run.steps=3", "run.log_every=1", "checkpoint.every=1", "checkpoint.keep=2"]
    results = []
    with _reaped(_start(args), _start(args)) as procs:
        for proc in procs:
            out, err = proc.communicate(timeout=240)
            results.append((proc.returncode, err.strip().splitlines()))
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    refused = next(err for rc, err in results if rc == 2)
    assert len(refused) == 1 and f"run.dir={run_dir} is in use by process" in refused[0], refused
    steps = sorted(int(d) for d in os.listdir(run_dir / "checkpoints") if d.isdigit())
    assert steps == [2, 3]  # one writer's rotation: no orphan step
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # no duplicate or torn lines


# 4. Every value a sparse export's metadata holds is checked before use
def _sparse_file(tmp_path, encoding):
    """A valid sparse file holding one pruned tensor `w` (bitmask or 2:4), and its metadata."""
    w = np.arange(1, 65, dtype=np.float32).reshape(16, 4)
    if encoding == "nm":
        w[::2] = 0  # 2 of every 4 along dim 0
    else:
        w[np.random.default_rng(0).random(w.shape) < 0.5] = 0  # no N:M pattern: stored with a bitmask
    pieces, how = sparse.encode("w", w, (2, 4) if encoding == "nm" else None)
    assert how["encoding"] == encoding
    return {n: a for n, a in pieces}, {"format": "jaxinfra", "sparse": "1", "encoding.w": json.dumps(how)}, how, w


BAD = [  # (encoding to start from, change of the rebuild info or of the pieces, words of the error)
    ("bitmask", lambda h, p: "{not json", "not a valid encoding"),
    ("bitmask", lambda h, p: "[1, 2]", "not bitmask or nm"),
    ("bitmask", lambda h, p: dict(h, encoding="rle"), "'rle', not bitmask or nm"),
    ("bitmask", lambda h, p: {k: v for k, v in h.items() if k != "shape"}, "shape None"),
    ("bitmask", lambda h, p: dict(h, shape=[16, -4]), "non-negative integers"),
    ("bitmask", lambda h, p: dict(h, shape=[2 ** 20, 2 ** 16]), "bytes for shape"),  # asks for 256 GiB
    ("bitmask", lambda h, p: dict(h, shape="16x4"), "is not a list"),
    ("bitmask", lambda h, p: dict(h, dtype="float64"), "differs from its values"),
    ("bitmask", lambda h, p: (p.pop("w.mask"), h)[1], "mask piece is missing"),
    ("bitmask", lambda h, p: p.update({"w.values": p["w.values"].reshape(1, -1)}) or h, "not 1-D"),
    ("bitmask", lambda h, p: p.update({"w.mask": np.full_like(p["w.mask"], 255)}) or h, "its mask marks 64 entries for"),
    ("nm", lambda h, p: dict(h, m=0), "is not 0 < N < M"),
    ("nm", lambda h, p: dict(h, n=4, m=4), "is not 0 < N < M"),
    ("nm", lambda h, p: dict(h, shape=[18, 4]), "does not hold"),
    ("nm", lambda h, p: p.update({"w.indices": p["w.indices"][:-1]}) or h, "indices piece"),
    ("nm", lambda h, p: p.update({"w.indices": np.full_like(p["w.indices"], 9)}) or h, "outside its group of 4"),
]


@pytest.mark.parametrize("encoding, change, words", BAD)
def test_hostile_sparse_metadata_is_one_line(tmp_path, capsys, encoding, change, words):
    pieces, meta, how, w = _sparse_file(tmp_path, encoding)
    good = tmp_path / "good.safetensors"
    save_file(pieces, str(good), metadata=meta)
    np.testing.assert_array_equal(jaxinfra.load_safetensors(str(good))["w"], w)
    changed = change(dict(how), pieces)
    meta["encoding.w"] = changed if isinstance(changed, str) else json.dumps(changed)
    bad = tmp_path / "bad.safetensors"
    save_file(pieces, str(bad), metadata=meta)
    with pytest.raises(UserError) as e:
        jaxinfra.load_safetensors(str(bad))
    msg = str(e.value)
    assert "\n" not in msg and str(bad) in msg and words in msg, msg


def test_compare_on_a_hostile_export_exits_2(tmp_path, capsys):
    pieces, meta, how, _ = _sparse_file(tmp_path, "nm")
    meta["encoding.w"] = json.dumps(dict(how, m=0))
    for name in ("dense", "pruned"):
        run = tmp_path / name
        (run / "exports").mkdir(parents=True)
        (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        save_file(pieces, str(run / "exports" / "model-1.safetensors"), metadata=meta)
    assert cli.compare_main([str(tmp_path / "dense"), str(tmp_path / "pruned")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "encoding.w is not a valid encoding" in err[0], err


# 1. Damaged checkpoint bytes are refused on every read (resume, export, sampling), not loaded
@pytest.fixture(scope="session")  # once per worker, even if xdist interleaves modules
def saved_run(tmp_path_factory):
    """The user model's run, checkpointed at steps 5 and 10."""
    run = tmp_path_factory.mktemp("flips") / "run"
    args = [*NET, f"run.dir={run}", "checkpoint.every=5", "checkpoint.export_final=false"]
    jaxinfra.train_model(tiny_config(*args), Net, xent, dataset())
    return run, args, jaxinfra.read_params(str(run))[0]


# The model: arrays large enough that OCDBT stores them out of line in the per-process data
# files, which carry no checksum of their own (smaller ones sit inline in CRC-checked b-tree nodes)
LM = ["data.tokenizer=bytes", "model.n_layers=1", "model.d_model=64", "model.d_ff=128", "model.seq_len=32", "data.batch_size=16",
      "run.steps=10", "checkpoint.every=5", "run.eval_batches=0", "run.sample_tokens=0", "run.progress=false",
      "run.plot=false", "checkpoint.export_final=false"]


@pytest.fixture(scope="session")  # once per worker, even if xdist interleaves modules
def lm_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("lm_flips") / "run"
    assert cli.main([*LM, f"run.dir={run}"]) == 0
    return run


ROOT = "the root node"  # the index's name for the b-tree node step 10's manifest points to


def _located(state, location):
    """(file, offset, length) of an OCDBT location, "<kind>:<base path>:<data file>:<offset>:<length>"."""
    rest, offset, length = location.split(":", 1)[1].rsplit(":", 2)
    base, name = rest.split(":", 1)
    return state / (base + name), int(offset), int(length)


def _index(state):
    """Where the bytes a restore of `state` reads lie, from tensorstore's dump of its OCDBT database: the
    manifest's newest version names the root b-tree node (ROOT), whose entries give each value stored out
    of line (key -> data file, offset, length); smaller values sit inline in the node. For step 10 of LM:
    a root node of about 4.3 kB in state/d/ holding all 330 keys, and 208 chunks (72 of parameters, 136
    of optimizer state) out of line in three or four files of state/ocdbt.process_0/d/, the split among
    them varying run to run, the chunks' bytes not. The three or four other files there (the process's
    own tree before the merge) and ocdbt.process_0/manifest.ocdbt are opened by no read."""
    base = ts.KvStore.open(f"file://{state}/").result()
    root = ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]
    index = {ROOT: _located(state, root)}

    def walk(location, prefix):
        for entry in ts.ocdbt.dump(base, location).result()["entries"]:
            if "location" in entry:  # a child of an interior node: its keys continue the common prefix
                walk(entry["location"], prefix + entry.get("subtree_common_prefix", b""))
            elif "indirect_value" in entry:
                index[(prefix + entry["key"]).decode()] = _located(state, entry["indirect_value"])

    walk(root, b"")
    return index


def _chunk(index, tensor, pick=0):
    """The `pick`-th chunk (in key order, modulo their number) that `tensor` stores out of line."""
    chunks = sorted(k for k in index if k.startswith(tensor + "/"))
    assert chunks, f"{tensor} has no chunk out of line: {sorted(index)}"
    return chunks[pick % len(chunks)]


def _restored(run, cfg, **kw):
    """The whole train state restored from `run` onto a (2,2,2) mesh, as host arrays."""
    mesh = mesh_of((2, 2, 2))
    with jax.set_mesh(mesh):
        ck = ckpt_lib.Checkpointer(str(run / "checkpoints"), read_only=True)
        try:
            return shd.gather(ckpt_lib.resume(ck, model_plan(cfg, mesh).abstract, **kw))
        finally:
            ck.close()


def _check_flips(lm_run, tmp_path, index, flips):
    """Each flip, (key of `index` or ROOT, byte of its stored bytes, words of read_params' refusal, words of
    the resume's), inverts that byte of step 10 in a copy of lm_run, which two reads then take: read_params
    (the export path: parameters only) and a whole-state resume. A read given words must refuse with one
    line holding them; a read given None must return exactly the saved values. A resume with
    checkpoint.fallback=true must then take step 5."""
    cfg = tiny_config(*LM)
    original = jaxinfra.read_params(str(lm_run))[0]
    whole = jax.tree.leaves(_restored(lm_run, cfg))
    reads = {"read_params": (lambda copy: [jaxinfra.read_params(str(copy))[0][k] for k in original],
                             list(original.values())),
             "resume": (lambda copy: jax.tree.leaves(_restored(copy, cfg)), whole)}
    for i, (key, byte, *refusals) in enumerate(flips):
        file, offset, length = index[key]
        assert 0 <= byte < length, (key, byte, length)
        where = f"{key} byte {byte} of {length} ({file.relative_to(lm_run)} at {offset + byte})"
        copy = tmp_path / f"copy{i}"
        shutil.copytree(lm_run, copy)
        try:
            with open(copy / file.relative_to(lm_run), "r+b") as f:
                f.seek(offset + byte)
                value = f.read(1)[0]
                f.seek(offset + byte)
                f.write(bytes([value ^ 0xFF]))
            for (name, (read, want)), words in zip(reads.items(), refusals, strict=True):
                if words is None:  # this read does not use the flipped bytes: it returns the saved values
                    for a, b in zip(read(copy), want, strict=True):
                        np.testing.assert_array_equal(a, b, err_msg=f"{name} after flipping {where}")
                    continue
                with pytest.raises(UserError) as e:
                    read(copy)
                msg = str(e.value)
                assert "unreadable" in msg and "checkpoints/10" in msg and "\n" not in msg, (name, where, msg)
                assert words in msg, (name, where, msg)
            assert int(_restored(copy, cfg, fallback=True).step) == 5, where
        finally:
            shutil.rmtree(copy)


DIGEST = "differs from the bytes saved"  # the digests' refusal: the chunk decoded, to wrong values
CRC = "DATA_LOSS"  # tensorstore's refusal of a b-tree node whose CRC-32C fails


def test_flipped_bytes_in_array_data_are_refused(lm_run, tmp_path):
    """The middle byte of a parameters chunk, of an optimizer-state chunk and of the root node. The chunks
    still decode (their zstd frames carry no checksum), to other values: the digests refuse them."""
    index = _index(lm_run / "checkpoints" / "10" / "state")
    middle = lambda key: (key, index[key][2] // 2)
    _check_flips(lm_run, tmp_path, index, [
        (*middle(_chunk(index, "params.head")), f"tensor params/head {DIGEST}", f"tensor params/head {DIGEST}"),
        (*middle(_chunk(index, "opt_state.1.0.mu.head")), None, f"tensor opt_state/1/0/mu/head {DIGEST}"),
        (*middle(ROOT), CRC, CRC),
    ])


@pytest.mark.slow
def test_many_flipped_bytes_are_refused(lm_run, tmp_path):
    """One byte of one chunk of every tensor stored out of line (chunk and byte drawn with a fixed seed from
    the index), the first and last byte of a chunk of each kind (zstd's frame header and end: tensorstore
    refuses those itself) and five bytes of the root node (first, quarters, last): a parameters chunk is
    refused by both reads, an optimizer-state chunk by the resume alone, the root node by both."""
    index, rng = _index(lm_run / "checkpoints" / "10" / "state"), np.random.default_rng(1)
    refused_by = lambda key: (None, "unreadable") if key.startswith("opt_state.") else ("unreadable", "unreadable")
    tensors = sorted({k.split("/")[0] for k in index if k != ROOT})
    keys = [_chunk(index, t, int(rng.integers(64))) for t in tensors]
    flips = [(k, int(rng.integers(index[k][2])), *refused_by(k)) for k in keys]
    for key in (_chunk(index, "params.embed"), _chunk(index, "opt_state.1.0.nu.embed")):
        flips += [(key, 0, *refused_by(key)), (key, index[key][2] - 1, *refused_by(key))]
    length = index[ROOT][2]
    flips += [(ROOT, b, CRC, CRC) for b in (0, length // 4, length // 2, 3 * length // 4, length - 1)]
    assert len(tensors) == 27 and len(flips) == 36  # 9 tensors of parameters, their Adam mu and nu
    _check_flips(lm_run, tmp_path, index, flips)


def test_a_step_holding_other_bytes_is_refused_by_its_digests(saved_run, tmp_path, capsys):
    run, args, _ = saved_run  # step 10's arrays replaced by step 5's: valid files, wrong bytes for step 10
    copy = tmp_path / "swapped"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "10" / "state")
    shutil.copytree(copy / "checkpoints" / "5" / "state", copy / "checkpoints" / "10" / "state")
    for read in (lambda: jaxinfra.read_params(str(copy)),
                 lambda: jaxinfra.train_model(tiny_config(*args, f"run.dir={copy}"), Net, xent, dataset())):
        with pytest.raises(UserError, match=r"checkpoint step 10 is unreadable .* tensor \S+ differs from the bytes "
                                            r"saved .*checkpoints/10/state is damaged"):
            read()
    assert cli.export_main([str(copy), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "differs from the bytes saved" in capsys.readouterr().err
    assert cli.inspect_main([str(copy), "--verify"]) == 2
    assert "differs from the bytes saved" in capsys.readouterr().err
    assert cli.inspect_main([str(run), "--verify"]) == 0
    assert "verified: the 4 model tensors match the digests recorded at save" in capsys.readouterr().out
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "m.safetensors.partial").exists()
    final = jaxinfra.train_model(tiny_config(*args, f"run.dir={copy}", "checkpoint.fallback=true", "run.steps=11"),
                                 Net, xent, dataset())
    assert final["start_step"] == 5


# 8. restore_step sets the newer steps aside; they go only once the run has committed a step of its own
@pytest.mark.slow
def test_restore_step_then_a_kill_loses_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main([*TINY, "run.steps=6", "checkpoint.every=3", "checkpoint.keep=3", f"run.dir={run_dir}",
                     "run.eval_batches=0", "checkpoint.export_final=false"]) == 0
    going_back = _start([*TINY, f"run.dir={run_dir}", "checkpoint.restore_step=3", "run.steps=100000",
                         "checkpoint.every=1000", "run.eval_batches=0"])
    with _reaped(going_back):  # killed before it commits a step of its own
        _wait_for_line(going_back, "set aside newer checkpoint steps 6")
    assert (run_dir / "checkpoints" / ".aside" / "6").is_dir()
    capsys.readouterr()
    assert cli.main([*TINY, "run.steps=7", f"run.dir={run_dir}", "run.eval_batches=0",
                     "checkpoint.export_final=false"]) == 0
    out = capsys.readouterr().out
    assert "put back checkpoint steps 6" in out and "resumed from step 6" in out
    assert not (run_dir / "checkpoints" / ".aside").exists()


# 10. SIGTERM while the step compiles saves and exits 0, as it does during training
def test_sigterm_during_compilation_saves_and_exits_zero(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start([*TINY, f"run.dir={run_dir}", "run.steps=100000", "checkpoint.every=0", "run.eval_batches=0"])
    with _reaped(proc):
        before = _wait_for_line(proc, "parameters; sharding:")  # printed just before the step compiles (1 s here)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    lines = (before + out).splitlines()
    at = lambda words: next(i for i, line in enumerate(lines) if words in line)
    # Python runs the handler at the main thread's next instruction once XLA's compile returns, so its line
    # before "train step compiled" shows the signal came while the step compiled; after the line we waited for
    received = at("SIGTERM received before the first step of this run: the run saves at the end of its current step")
    assert at("parameters; sharding:") < received < at("train step compiled in"), out
    assert "stopping at step 1 (SIGTERM); checkpoint saved" in out, out
    assert [d for d in os.listdir(run_dir / "checkpoints") if d.isdigit()] == ["1"]


# 6. Failures one line, nothing lost: an export that fails, an export racing rotation, a full disk
@pytest.mark.slow
def test_a_failed_export_fails_the_run_unless_told_to_warn(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "exports").write_text("not a folder")  # every export of this run fails
    args = [*TINY, "run.steps=3", f"run.dir={run_dir}", "run.eval_batches=0"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"export of step 3 to {run_dir}/exports/model-3.safetensors failed" in err[0], err
    assert "checkpoint.export_errors=warn" in err[0]
    assert jaxinfra.read_params(str(run_dir))[1] == 3  # the checkpoint is there
    assert cli.main([*args, "run.steps=4", "checkpoint.export_errors=warn"]) == 0
    assert "warning: export of step 4" in capsys.readouterr().out


def test_reading_a_step_that_rotation_removes_is_one_line(saved_run, tmp_path):
    run, _, _ = saved_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step, tensors = ckpt_reader.iter_params(str(copy))
    next(tensors)
    shutil.rmtree(copy / "checkpoints" / str(step))  # what a writer's rotation does with keep=1
    with pytest.raises(UserError, match=rf"checkpoints/{step} was removed while tensor \S+ was being read"):
        next(tensors)


def test_symlinks_in_the_run_folder_are_refused(tmp_path, capsys):
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere.jsonl"
    run_dir.mkdir()
    elsewhere.write_text("")
    (run_dir / "metrics.jsonl").symlink_to(elsewhere)
    assert cli.main([*TINY, "run.steps=2", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl is a symbolic link" in err[0], err
    assert elsewhere.read_text() == "" and not (run_dir / ".jaxinfra.lock").exists()


def test_metrics_stay_strict_json(tmp_path):
    from jaxinfra.train.metrics import MetricsWriter
    writer = MetricsWriter(str(tmp_path), 3, progress=False, tensorboard=False).open()
    writer.write(1, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    writer.close()
    strict = lambda token: (_ for _ in ()).throw(ValueError(token))  # refuse NaN / Infinity literals
    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict)
    assert row == {"step": 1, "loss": None, "grad_norm": None, "lr": 0.5}


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs the test mounts itself (root only; a step of TINY takes 1.2 to 2.3 MB there, varying
    run to run): skipped, with the reason, where it cannot."""
    import subprocess
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_saves_is_one_line_and_keeps_the_last_good_step(small_disk, tmp_path):
    run_dir = small_disk / "run"
    proc = _start([*TINY, f"run.dir={run_dir}", "run.steps=1000", "checkpoint.every=1", "checkpoint.keep=1000",
                   "run.eval_batches=0", f"data.cache={tmp_path / 'cache'}"])  # the saves fill the disk, not the tokens
    with _reaped(proc):
        out, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and "No space left on device" in lines[0] and str(run_dir) in lines[0]
    kept = tmp_path / "kept"
    shutil.copytree(run_dir, kept, ignore=shutil.ignore_patterns("*.orbax-checkpoint-tmp*"))
    flat, step = jaxinfra.read_params(str(kept))  # the newest committed step reads back, digests checked
    assert step >= 1 and flat
    assert not list(run_dir.rglob("*.partial"))


def test_export_onto_a_full_disk_is_one_line_and_exit_1(saved_run, small_disk, capsys):
    run, _, _ = saved_run
    with contextlib.suppress(OSError), open(small_disk / "filler", "wb", buffering=0) as f:
        while True:  # the disk full before the export starts
            f.write(b"\0" * (1 << 16))
    out = small_disk / "model.safetensors"
    code = cli.export_main([str(run), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("error: ") and "No space left on device" in err[0] and str(small_disk) in err[0]
    assert not out.exists() and not list(small_disk.glob("*.partial"))  # nothing half-written is left

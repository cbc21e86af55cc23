"""Every program in examples/ runs a few steps on the simulated (2, 2, 2) mesh, in this process."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == ["cnn_classifier", "mesh_only", "mlp_classifier"]


@pytest.mark.slow
def test_cnn_classifier_with_batchnorm_and_dropout_trains_prunes_2_4_and_exports(tmp_path, capsys):
    assert _load("cnn_classifier").main(["--steps", "12", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "conv2/kernel" in out and "2:4 along dim 2" in out  # groups along conv2's input channels
    accuracy = float(out.split("held-out accuracy ")[1].split(",")[0])
    assert accuracy > 0.3  # 10 classes: chance is 0.1
    assert (tmp_path / "checkpoints" / "12").is_dir()
    from jaxinfra.export.safetensors import load
    flat = load(str(tmp_path / "exports" / "model-12.safetensors"))
    assert {"bn1.mean", "bn1.var", "bn2.mean", "bn2.var"} <= set(flat)  # batch statistics beside the weights
    assert ((flat["conv2.kernel"] != 0).reshape(3, 3, 4, 4, 32).sum(axis=3) == 2).all()


def test_mlp_classifier_trains_prunes_and_checkpoints(tmp_path, capsys):
    ex = _load("mlp_classifier")
    assert ex.main(["--steps", "20", "--dir", str(tmp_path), "run.eval_every=0"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=2 x fsdp=2 x tensor=2" in out
    assert "features,hidden  ('fsdp', 'tensor')" in out  # its own logical names, mapped by its rules
    accuracy = float(out.split("held-out accuracy ")[1].split(",")[0])
    assert accuracy > 0.5  # 8 classes: chance is 0.125
    assert (tmp_path / "checkpoints" / "20").is_dir() and (tmp_path / "exports" / "model-20.safetensors").is_file()
    import json
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["step"] == 20 and train_rows[-1]["sparsity"] == pytest.approx(0.5, abs=1e-6)  # prune.sparsity reached by end_step


def test_mlp_classifier_user_error_is_one_line(tmp_path, capsys):
    ex = _load("mlp_classifier")
    assert ex.main(["--steps", "2", "--dir", str(tmp_path), "mesh.rules.hiden=[tensor]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mesh.rules.hiden" in err[0] and "hidden" in err[0], err


def test_mesh_only_loop(capsys):
    assert _load("mesh_only").main(["--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "w1 P('fsdp', 'tensor')" in out and "per-device shard of w1 (8, 16)" in out
    first, last = (float(x) for x in out.split("loss ")[-1].splitlines()[0].split(" -> "))
    assert last < first / 3

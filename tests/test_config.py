"""Config loading: YAML + dotted overrides into dataclasses; every bad input is one UserError line."""
import pytest

from jaxinfra.core.errors import UserError
from jaxinfra.settings.loading import load_config, to_yaml
from jaxinfra.settings.sections import Config


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  steps: 7\nmodel:\n  d_model: 64\nmesh:\n  rules:\n    mine: [tensor]\n")
    cfg = load_config(str(path), ["run.steps=9", "optim.name=lion", "mesh.data=-1", "run.sample_prompts=[a, b]"])
    assert isinstance(cfg, Config)
    assert cfg.run.steps == 9 and cfg.model.d_model == 64 and cfg.optim.name == "lion"
    assert cfg.mesh.data == -1 and cfg.run.sample_prompts == ["a", "b"]
    assert cfg.mesh.rules["mine"] == ["tensor"] and cfg.mesh.rules["batch"] == ["data", "fsdp"]
    assert "steps: 9" in to_yaml(cfg)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["run.steps=11", "model.n_layers=3"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize("override, words", [
    (["run.stpes=3"], ["run.stpes", "run.steps"]),
    (["modle.d_model=3"], ["modle", "model"]),
    (["run.steps=abc"], ["run.steps", "abc"]),
    (["optim.name=adamm"], ["optim.name", "adamw"]),
    (["model.remat=sometimes"], ["model.remat", "none, full, dots"]),
    (["run.steps=0"], ["run.steps=0"]),
    (["optim.lr=-1"], ["optim.lr=-1"]),
    (["data.batch_size=30", "optim.grad_accum=4"], ["data.batch_size=30", "optim.grad_accum=4"]),
    (["model.d_model=100", "model.n_heads=3"], ["model.d_model=100", "model.n_heads=3"]),
    (["mesh.data=-1", "mesh.fsdp=-1"], ["-1"]),
    (["mesh.tensor=0"], ["mesh.tensor=0"]),
    (["mesh.rules.embed=[fsdq]"], ["mesh.rules.embed", "fsdq", "fsdp"]),
    (["data.path=/no/such/place"], ["data.path=/no/such/place"]),
    (["run.steps"], ["run.steps", "key.sub=value"]),
    (["run.profile_steps=[3,2]"], ["run.profile_steps=[3, 2]"]),
    (["prune.sparsity=1.0"], ["prune.sparsity=1.0"]),
    (["prune.pattern=4:2"], ["prune.pattern=4:2", "N=4", "M=2"]),
    (["prune.pattern=half"], ["prune.pattern='half'"]),
    (["prune.sparsity=0.5", "prune.end_step=600", "run.steps=600"], ["prune.end_step=600", "run.steps=600"]),
    (["prune.sparsity=0.5", "prune.start_step=50", "prune.end_step=40"], ["prune.start_step=50", "end_step=40"]),
    (["run.sample_prompts=['é']", "model.vocab_size=128"], ["run.sample_prompts", "model.vocab_size=128"]),
    (["run.sample_prompts=[[1]]"], ["run.sample_prompts", "[1] is not a string"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(UserError) as e:
        load_config(None, override)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "a.yaml").write_text("run: [1, 2\n")
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    for name in ("a.yaml", "b.yaml", "missing.yaml"):
        with pytest.raises(UserError, match=name):
            load_config(str(tmp_path / name))


def test_no_jax_import_needed():
    import subprocess
    import sys
    code = "import sys, jaxinfra.settings.loading as c; c.load_config(None, []); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_shipped_config_loads():
    from pathlib import Path
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        cfg = load_config(str(path))
        assert cfg.run.name == path.stem

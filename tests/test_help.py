"""jaxinfra-train --help lists every config key, --print-config prints the merged config without JAX, and every
command maps UserError / Failed / OSError to one line on stderr with exit status 2 / 1 / 1."""
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from jaxinfra import cli
from jaxinfra.core.errors import Failed, UserError
from jaxinfra.settings.sections import Config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"


def _leaves(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Dotted key -> field of every leaf of a config dataclass (walked here, not by the code under test)."""
    hints, out = typing.get_type_hints(schema), {}
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_leaves(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = f
    return out


def test_every_field_of_every_section_has_a_one_line_meaning():
    leaves = _leaves(Config)
    assert len(leaves) > 80 and {"run.steps", "mesh.fsdp", "prune.sparsity", "quant.weights"} <= set(leaves)
    for key, f in leaves.items():
        meaning = f.metadata.get("help")
        assert isinstance(meaning, str) and meaning.strip() and "\n" not in meaning, key


def test_help_lists_every_key_with_type_default_and_meaning(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "COLUMNS": "100"})
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("  --config") for line in lines) and "key.sub=value" in out.stdout
    assert any(line.startswith("  --print-config") for line in lines)
    for head in ("run.steps: int = 600 (--config default: 3050)", "mesh.fsdp: int = 2", "prune.sparsity: float = 0.0",
                 "data.glob: str = '*.py'", "run.profile_steps: list[int] = []"):
        i = lines.index(f"  {head}")
        assert lines[i + 1].startswith("      ") and lines[i + 1].strip(), (head, lines[i + 1])  # its meaning
    for key in _leaves(Config):
        assert any(line.startswith(f"  {key}: ") for line in lines), f"{key} missing from --help"
    sections = [m.group(1) for m in map(re.compile(r"([a-z]+): ").match, lines) if m and m.group(1) != "usage"]
    assert sections == [f.name for f in dataclasses.fields(Config)]  # each key under its section's heading


def test_help_starts_no_jax():
    code = ("import sys\nfrom jaxinfra.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\nsys.exit(3 if 'jax' in sys.modules else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run.steps: int = 600" in out.stdout, out.stderr[-2000:]


def test_print_config_from_elsewhere_without_jax(tmp_path):
    # the entry point's code, run from a folder that is not the checkout; exit 3 if it imported JAX
    code = ("import sys; from jaxinfra.cli import main; code = main(sys.argv[1:]); "
            "sys.exit(3 if 'jax' in sys.modules else code)")
    for argv in (["--config", "tp", "run.steps=7", "--print-config"], ["--print-config", "run.steps=7"]):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path)
        assert out.returncode == 0 and out.stderr == "", (out.returncode, out.stderr[-2000:])
        cfg = yaml.safe_load(out.stdout)
        assert cfg["run"]["steps"] == 7 and cfg["prune"]["sparsity"] == 0.0
        assert cfg["mesh"]["tensor"] == (8 if "tp" in argv else 2)
    assert list(tmp_path.iterdir()) == []  # no run folder, no devices: nothing written


def test_print_config_reports_a_bad_value(capsys):
    assert cli.main(["run.steps=0", "--print-config"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "error: run.steps=0 must be at least 1\n"


def _raise(e: BaseException):
    """A command body that fails with `e`."""
    def body() -> int:
        raise e
    return body


@pytest.mark.parametrize("error, code, line", [
    (UserError("checkpoint.keep=0 must be at least 1"), 2, "error: checkpoint.keep=0 must be at least 1"),
    (Failed("saving step 4 failed: disk quota exceeded"), 1, "error: saving step 4 failed: disk quota exceeded"),
    (OSError(28, "No space left on device", "/x/y"), 1, "error: /x/y: No space left on device"),
    (OSError(28, "No space left on device"), 1, "error: No space left on device"),
])
def test_guard_maps_errors_to_one_line_and_status(error, code, line, capsys):
    assert cli._guard(_raise(error)) == code
    out = capsys.readouterr()
    assert out.out == "" and out.err == line + "\n"


def test_guard_passes_other_errors_and_results_through(capsys):
    assert cli._guard(lambda: 0) == 0
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli._guard(_raise(KeyError("x")))
    assert capsys.readouterr().err == ""


def test_tool_commands_use_the_guard(tmp_path, monkeypatch, capsys):
    def full_disk(run_dir, out):
        raise OSError(28, "No space left on device", str(tmp_path / "plots.png"))
    monkeypatch.setattr("jaxinfra.train.plots.plot_run", full_disk)
    assert cli.plot_main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'plots.png'}: No space left on device\n"

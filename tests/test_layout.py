"""The house's rules, checked as CI checks them: the import contracts of pyproject.toml (lint-imports), a
forbidden import caught, modules under 400 lines, packages that re-export nothing, imports at the top."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxinfra"
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
MAX_LINES = 400
# imports that stay inside a function, each for its reason
LAZY = {
    "jaxinfra/cli.py": "each command imports its backend (JAX, Orbax) only after its arguments are valid: start-up",
    "jaxinfra/train/plots.py": "matplotlib, only when plotting",
    "jaxinfra/train/trainer.py": "the plots module (matplotlib), only when plotting",
    "jaxinfra/train/metrics.py": "tensorboardX, only when a writer opens",
    "jaxinfra/train/compare.py": "the command line reads metrics.jsonl before JAX and Orbax load",
    "jaxinfra/core/storage.py": "the optional cloud clients (s3fs, gcsfs, fsspec's backends)",
}


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    out = _lint(ROOT, ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("module, line, message", [
    ("core/names.py", "import jax", "jaxinfra.core is not allowed to import jax"),
    ("models/transformer.py", "from jaxinfra.train import step", "jaxinfra.models is not allowed to import jaxinfra.train"),
    ("train/saver.py", "from jaxinfra.lm import job", "jaxinfra.train is not allowed to import jaxinfra.lm"),
])
def test_a_forbidden_import_is_caught(tmp_path, module, line, message):
    shutil.copytree(PACKAGE, tmp_path / "jaxinfra", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "jaxinfra" / module
    text = path.read_text()
    cut = text.index("\nfrom __future__ import annotations\n") + len("\nfrom __future__ import annotations\n")
    path.write_text(text[:cut] + line + "\n" + text[cut:])
    out = _lint(tmp_path, tmp_path)
    assert out.returncode == 1 and message in out.stdout, out.stdout + out.stderr


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_under_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_packages_reexport_nothing_but_the_public_face():
    for init in PACKAGE.glob("*/__init__.py"):
        body = ast.parse(init.read_text()).body
        assert len(body) == 1 and isinstance(body[0].value, ast.Constant), init  # one docstring line


def test_imports_inside_functions_only_where_they_save_start_up_or_reach_an_optional_dependency():
    found = set()
    for p in _modules():
        tree = ast.parse(p.read_text())
        tc = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
              for n in ast.walk(node)}
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and id(node) not in tc:
                found.add(str(p.relative_to(ROOT)))
    assert found <= set(LAZY), sorted(found - set(LAZY))

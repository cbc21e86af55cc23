"""The package as a user installs it: a wheel that ships every config, and `--config NAME` resolving
a shipped config from any folder, outside a checkout."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_config_and_the_cli_finds_them_outside_a_checkout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "jaxinfra", src / "jaxinfra", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("jaxinfra-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = sorted(p.name for p in (ROOT / "jaxinfra" / "configs").glob("*.yaml"))
    assert len(shipped) >= 6 and {f"jaxinfra/configs/{n}" for n in shipped} <= names, sorted(names)

    site = tmp_path / "site"  # a plain (non-editable) install of that wheel, used from an empty folder
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import sys, jaxinfra, jaxinfra.cli as cli, jaxinfra.settings.loading as c\n"
            "print(jaxinfra.__file__)\nprint(c.config_path('accelerator'))\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code, "--config", "accelerator", "run.steps=0"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=120)
    module, config = out.stdout.splitlines()[:2]
    assert module.startswith(str(site)) and config == str(site / "jaxinfra" / "configs" / "accelerator.yaml")
    assert out.returncode == 2 and out.stderr.strip() == "error: run.steps=0 must be at least 1", out.stderr
    out = subprocess.run([sys.executable, "-c", code, "--config", "acelerator"], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--config acelerator: no such file (shipped configs: accelerator, default" \
        in out.stderr, out.stderr

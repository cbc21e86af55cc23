"""Every ```python block of docs/*.md runs (so the guides cannot rot): one fresh namespace per
guide, its blocks in order, on 8 simulated CPU devices, in one subprocess with a scratch cwd."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- no-test -->\s*\n)?```python\n(.*?)```", re.S)

RUNNER = """
import json, sys, traceback
sys.path.insert(0, sys.argv[2])
from jaxinfra.parallel.mesh import use_cpu_devices
use_cpu_devices(8)
failures = []
for doc, blocks in json.loads(open(sys.argv[1]).read()).items():
    namespace = {"__name__": "__doc_" + doc.replace(".", "_")}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{doc} block {i + 1}", "exec"), namespace)
        except BaseException:
            failures.append(f"{doc} block {i + 1}:\\n" + traceback.format_exc(limit=3))
            break  # later blocks of a guide build on earlier ones
print("\\n".join(failures) or "all blocks ran")
sys.exit(1 if failures else 0)
"""


def blocks():
    """{guide: [code of each python block not marked no-test]}."""
    out = {}
    for doc in sorted(DOCS.glob("*.md")):
        found = [code for skip, code in BLOCK.findall(doc.read_text()) if not skip]
        if found:
            out[doc.name] = found
    return out


def test_guides_exist_and_have_runnable_snippets():
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"mesh.md", "strategies.md", "pruning.md", "api.md", "checkpoints.md", "launching.md"} <= names
    found = blocks()
    assert {"mesh.md", "strategies.md", "pruning.md", "api.md", "checkpoints.md"} <= set(found)
    skipped = sum(len(BLOCK.findall(p.read_text())) for p in DOCS.glob("*.md")) - sum(map(len, found.values()))
    assert skipped <= 2  # no-test is for what cannot run here (multi-host launch), not a way out


def test_every_python_block_runs(tmp_path):
    (tmp_path / "blocks.json").write_text(json.dumps(blocks()))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json"), str(ROOT)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]


def test_launching_md_shows_the_sbatch_file_as_it_is():
    """docs/launching.md quotes scripts/slurm/train.sbatch whole: the doc cannot drift from what is tested."""
    shown = re.findall(r"```bash\n(#!/bin/bash\n.*?)```", (DOCS / "launching.md").read_text(), re.S)
    assert shown == [(ROOT / "scripts" / "slurm" / "train.sbatch").read_text()]


def test_launching_md_kubernetes_manifest_is_valid_yaml():
    """The JobSet example parses, runs the launch script with exec (PID 1 receives SIGTERM) and names
    the coordinator as JobSet's DNS does (<jobset>-<job>-0-0.<jobset>)."""
    import yaml
    text = re.search(r"```yaml\n(.*?)```", (DOCS / "launching.md").read_text(), re.S).group(1)
    manifest = yaml.safe_load(text)
    job = manifest["spec"]["replicatedJobs"][0]
    pod = job["template"]["spec"]["template"]["spec"]
    command = " ".join(pod["containers"][0]["args"])
    assert command.startswith("exec python scripts/train.py")
    name, rjob = manifest["metadata"]["name"], job["name"]
    assert f"distributed.coordinator={name}-{rjob}-0-0.{name}:" in command
    assert f"distributed.num_processes={job['template']['spec']['completions']}" in command

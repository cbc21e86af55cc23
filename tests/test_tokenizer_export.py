"""The run's tokenizer reaches every export, sampling and generation: run_tokenizer finds it from a step folder;
the Hugging Face folder and the safetensors export carry it; generate.py and sampling encode and decode with it."""
import json
import os
import random
import re
import shutil

import jax
import pytest
from conftest import TINY, need

from jaxinfra import cli
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core.errors import UserError
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.export import writer as export_lib
from jaxinfra.lm.from_run import generate_from_run
from jaxinfra.models import decode
from jaxinfra.models.factory import model_fn
from jaxinfra.models.sampling import prompt_ids, sample
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.loading import load_config
from jaxinfra.train.step import abstract_model

pytestmark = pytest.mark.xdist_group("tokenizer_export")
STEPS = 3
# ASCII, accents, CJK, an emoji, code with indentation and tabs, and the end-of-text token's own text
STRINGS = ["hello world", "naïve café 東京 🎉", "def f(x):\n    return x\n\n\tif  y:\n", "a<|endoftext|>def g"]
WORDS = "the quick brown fox jumps over a lazy dog naïve café résumé 東京 数据 λ→∀ 🎉 tokenizer export".split()


def _documents(folder):
    """12 text files, about 100 KB: words in several scripts and small Python functions."""
    rng = random.Random(0)
    os.makedirs(folder)
    for i in range(12):
        lines = []
        for j in range(40):
            lines.append(" ".join(rng.choice(WORDS) for _ in range(8)))
            lines.append(f"def f{j}(x, y):\n    if x > {j}:\n        return x * y + {i}\n    return None\n")
        with open(os.path.join(folder, f"doc{i}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A tiny LM trained 3 steps with data.tokenizer=bpe:300 (the run exports exports/hf-3/), and a safetensors
    export of it written by the export script into the run's exports/."""
    d = tmp_path_factory.mktemp("tok")
    _documents(str(d / "docs"))
    run = d / "run"
    assert cli.main([*TINY, f"run.dir={run}", f"run.steps={STEPS}", f"data.path={d / 'docs'}", "data.glob=*.txt",
                     "data.tokenizer=bpe:300", "data.heldout_percent=20", "checkpoint.export_format=hf"]) == 0
    out = run / "exports" / f"model-{STEPS}.safetensors"
    assert cli.export_main([str(run), "--out", str(out)]) == 0
    return run, out


def _step_dir(run):
    return ckpt_reader.locate(str(run))[0]


def test_run_tokenizer_is_the_runs_from_any_of_its_folders(bpe_run):
    run, _ = bpe_run
    step_dir = _step_dir(run)
    saved = ckpt_reader.saved_config(step_dir)
    assert saved["data"]["tokenizer"] == "bpe:300"
    text = (run / "tokenizer.json").read_text()
    for folder in (step_dir, os.path.dirname(step_dir), str(run)):
        found = tok_lib.run_tokenizer(folder, saved)
        assert found.name == "bpe:300" and found.json_text == text and found.eot == 0
        assert found.vocab_size == 300


def test_run_tokenizer_by_the_saved_config(tmp_path):
    """bytes (said, or unsaid by a config older than tokenizers) is bytes whatever file lies about; a saved
    bpe:N with no tokenizer.json within 3 folders is a one-line UserError naming the folder."""
    step_dir = tmp_path / "runs" / "r" / "checkpoints" / "7"
    step_dir.mkdir(parents=True)
    trained = tok_lib.train_bpe([" ".join(WORDS).encode() * 20], 300)
    (tmp_path / "runs" / "tokenizer.json").write_text(trained.json_text)  # not this run's: above its folder
    for saved in ({"data": {"tokenizer": "bytes"}}, {"data": {}}, {"model": {}}):
        assert tok_lib.run_tokenizer(str(step_dir), saved).impl is None
    shutil.move(str(tmp_path / "runs" / "tokenizer.json"), str(tmp_path / "tokenizer.json"))  # 4 folders up
    with pytest.raises(UserError, match=f"^{re.escape(str(step_dir))}: trained with data.tokenizer=bpe:300, but no "
                       f"tokenizer.json") as e:
        tok_lib.run_tokenizer(str(step_dir), {"data": {"tokenizer": "bpe:300"}})
    assert "\n" not in str(e.value)
    assert tok_lib.run_tokenizer(str(step_dir), None).impl is None  # no record, no file: a byte-level run
    (tmp_path / "runs" / "r" / "tokenizer.json").write_text(trained.json_text)
    found = tok_lib.run_tokenizer(str(step_dir), {"data": {"tokenizer": "bpe:300"}})
    assert found.json_text == trained.json_text and found.encode("café") == trained.encode("café")
    with pytest.raises(UserError, match=f"holds {trained.vocab_size} ids, but the run trained with "
                       f"data.tokenizer=bpe:200"):
        tok_lib.run_tokenizer(str(step_dir), {"data": {"tokenizer": "bpe:200"}})


def test_transformers_reads_the_hf_export_as_our_tokenizer(bpe_run):
    transformers = need("transformers", "AutoTokenizer loads the exported tokenizer")
    run, _ = bpe_run
    ours = tok_lib.run_tokenizer(_step_dir(run), ckpt_reader.saved_config(_step_dir(run)))
    folder = run / "exports" / f"hf-{STEPS}"
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    for s in STRINGS:
        ids = ours.encode(s)
        assert theirs(s)["input_ids"] == ids, s
        assert theirs.decode(ids) == ours.decode(ids) == s
    assert any(len(ours.encode(s)) < len(s.encode()) for s in STRINGS)  # merges at work: not byte ids
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == ours.eot == theirs.eos_token_id == 0
    assert theirs.eos_token == tok_lib.EOT and config["vocab_size"] == 300
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0 and (folder / "tokenizer.json").read_text() == ours.json_text


def test_the_safetensors_export_carries_the_tokenizer(bpe_run, tmp_path):
    run, out = bpe_run
    text = (run / "tokenizer.json").read_text()
    meta = export_lib.export_metadata(str(out))
    assert meta[tok_lib.FILE] == text and meta["step"] == str(STEPS)
    carried = export_lib.export_tokenizer(str(out))
    assert [carried.encode(s) for s in STRINGS] == [tok_lib.from_json(text, "run").encode(s) for s in STRINGS]
    assert carried.eot == 0
    # sharded: the index finds it in the shards
    sharded = tmp_path / "s" / "model.safetensors"
    files = export_lib.export(str(run), str(sharded), max_shard_bytes=40_000)
    assert len(files) > 2 and export_lib.export_metadata(files[-1])[tok_lib.FILE] == text
    # a bytes run's export carries none (its step's record says bytes)
    step_dir = tmp_path / "b" / "checkpoints" / "1"
    (step_dir / "meta").mkdir(parents=True)
    (step_dir / "meta" / "metadata").write_text(json.dumps({"config": {"data": {"tokenizer": "bytes"}}}))
    assert export_lib.tokenizer_metadata(str(step_dir)) == {}


def test_generation_counts_and_decodes_tokens_through_the_runs_tokenizer(bpe_run):
    """generate.py's path from the run and from its export, and the sliding-window sampler, give the same text."""
    run, out = bpe_run
    prompts = ["def f", "café"]
    texts, step, info = generate_from_run(str(run), prompts, n_tokens=6, temperature=0.0)
    assert step == STEPS and info["batch"] >= 2
    again, step_e, _ = generate_from_run(str(out), prompts, n_tokens=6, temperature=0.0)
    assert again == texts and step_e == STEPS
    tokenizer = tok_lib.run_tokenizer(_step_dir(run), ckpt_reader.saved_config(_step_dir(run)))
    cfg = load_config(str(run / "config.yaml"))
    mesh, rules = make_mesh(1, 1, 1, devices=jax.devices()[:1]), cfg.mesh.logical_rules
    with jax.set_mesh(mesh):
        md = abstract_model(model_fn(cfg, mesh))
        flat, _ = ckpt_reader.read_params(str(run))
        params = shd.to_params(flat, md.params, shd.tree_shardings(md.logical, mesh, rules))
        ref = sample(md.eval_def, params, prompts, n_tokens=6, seq_len=cfg.model.seq_len, tokenizer=tokenizer,
                     temperature=0.0, seed=0, mesh=mesh, rules=rules)
        new, _ = decode.generate(params, cfg.model, prompts, n_tokens=6, temperature=0.0, seed=0, mesh=mesh,
                                 rules=rules, tokenizer=tokenizer)
    assert ref == texts == [tokenizer.decode(tokenizer.encode(p) + t) for p, t in zip(prompts, new)]
    assert all(t.startswith(p) for t, p in zip(texts, prompts)) and [len(t) for t in new] == [6, 6]


def test_prompt_errors_are_one_line(bpe_run, capsys):
    run, _ = bpe_run
    tokenizer = tok_lib.run_tokenizer(_step_dir(run), ckpt_reader.saved_config(_step_dir(run)))
    ids = tokenizer.encode("café")
    with pytest.raises(UserError, match=rf"prompt 'café' holds token {max(ids)} \(data.tokenizer=bpe:300\), "
                       rf"outside the model's vocab_size={max(ids)}"):
        prompt_ids("café", tokenizer, max(ids))
    with pytest.raises(TypeError, match="tokenizer="):
        decode._rows(["def"], 300, None)
    assert cli.generate_main([str(run), "--prompt", "", "--tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "prompt is empty" in err and "\n" not in err


def test_a_bpe_run_without_its_tokenizer_file_does_not_export(bpe_run, tmp_path, capsys):
    run, _ = bpe_run
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    assert cli.export_main([str(copy), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.tokenizer=bpe:300, but no tokenizer.json" in err and str(copy) in err and "\n" not in err
    assert not (tmp_path / "hf").exists()

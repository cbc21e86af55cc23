"""Hugging Face folders of the four families (llama, mistral, qwen2, qwen3), written by transformers itself:
from_pretrained's logits equal transformers' on one device and on the (2, 2, 2) mesh, the KV-cache decoder's
greedy tokens equal transformers' generate, a fine-tune from the folder exports back to a folder transformers
loads with equal logits, pruned on the pipeline's stage axis; what a family needs that the model lacks is one line."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from conftest import need
from flax import nnx
from hf_folders import FAMILIES, make_folder, write_jsonl
from safetensors import safe_open

from jaxinfra import cli
from jaxinfra.core.errors import UserError
from jaxinfra.data import tokenizer as tok_lib
from jaxinfra.hub import pretrained
from jaxinfra.models import decode
from jaxinfra.models.factory import fit_kv_heads
from jaxinfra.parallel.mesh import make_mesh

pytestmark = pytest.mark.xdist_group("test_families")
PROMPTS = ["def f12(x):\n    return", "    return x * 3", "# the 7th line of", "d"]  # unequal lengths
KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """family -> a folder transformers wrote (session: made once per worker)."""
    need("torch", "torch and transformers are the [hf] extra")
    need("transformers", "torch and transformers are the [hf] extra")
    root = tmp_path_factory.mktemp("families")
    return {family: make_folder(root, family) for family in FAMILIES}


def _rows(path):
    tokenizer = tok_lib.load(path)
    return [tokenizer.encode(p) for p in PROMPTS]


def _theirs(path, rows):
    """transformers' float32 logits of each prompt alone."""
    import torch
    import transformers
    int8 = "quantization_config" in json.loads(open(os.path.join(path, "config.json")).read())
    extra = {"quantization_config": transformers.CompressedTensorsConfig(dequantize=True)} if int8 else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()
    with torch.no_grad():
        return model, [model(torch.tensor([r])).logits[0].numpy() for r in rows]


def _ours(path, rows, shape):
    """Our logits of the prompts as one right-padded batch, the model loaded onto a (data, fsdp, tensor) mesh."""
    n = int(np.prod(shape))
    mesh = make_mesh(*shape, devices=jax.devices()[:n])
    model, _ = pretrained.from_pretrained(path, mesh=mesh)
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_on_one_device_and_the_mesh(folders, family):
    rows = _rows(folders[family])
    assert len({len(r) for r in rows}) == len(rows)  # unequal lengths: padding must not leak into a row
    _, theirs = _theirs(folders[family], rows)
    for shape in ((1, 1, 1), (2, 2, 2)):
        ours = _ours(folders[family], rows, shape)
        for i, r in enumerate(rows):
            np.testing.assert_allclose(ours[i, :len(r)], theirs[i], rtol=1e-4, atol=1e-4, err_msg=f"{shape} row {i}")


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f in ("llama", "mistral") else pytest.mark.slow)
                                    for f in FAMILIES])  # the fast lane: GQA + tied + llama3 rotary, and a window
def test_greedy_decoding_equals_transformers_generate(folders, family):
    import torch
    path, n = folders[family], 24
    rows = _rows(path)
    model, _ = _theirs(path, rows[:1])
    cfg = pretrained.folder_config(path, seq_len=64)
    mesh = make_mesh(-1, 1, 1)
    cfg = fit_kv_heads(cfg, mesh)
    ours_model, _ = pretrained.from_pretrained(path, mesh=mesh)
    params = nnx.to_pure_dict(nnx.state(ours_model, nnx.Param))
    ours, _ = decode.generate(params, cfg.model, rows, n_tokens=n, temperature=0, seed=0, mesh=mesh,
                              rules=cfg.mesh.logical_rules)
    compared = 0
    for row, mine in zip(rows, ours):
        with torch.no_grad():
            gen = model.generate(torch.tensor([row]), max_new_tokens=n, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        theirs, scores = gen.sequences[0, len(row):].tolist(), torch.stack(gen.scores)[:, 0].numpy()
        # the same tokens up to the first step whose two best logits are within 1e-3 (logits agree to ~1e-6:
        # a nearer tie may go either way, and every token after it then differs)
        top2 = np.sort(scores, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3
        upto = n if clear.all() else int(np.argmin(clear))
        assert mine[:upto] == theirs[:upto], (row, mine, theirs)
        compared += upto
    assert compared >= n * len(rows) // 2, f"only {compared} tokens had a clear margin: nothing proven"


def _fine_tune(folder, run, corpus, *extra):
    """scripts/train.py from the folder: 3 steps on the JSONL file (the architecture and tokenizer: the folder's)."""
    return cli.main([f"checkpoint.init_from={folder}", f"data.path={corpus}", f"run.dir={run}", "run.steps=3",
                     "model.seq_len=32", "data.batch_size=8", "run.progress=false", "run.sample_tokens=0",
                     "run.eval_every=0", "run.eval_batches=1", "run.plot=false", "run.score_heldout=false", *extra])


def _export_equals_transformers(run, out, family, *options):
    """export --format hf of the run, loaded by transformers: the family's class, and logits equal ours."""
    assert cli.export_main([str(run), "--format", "hf", "--out", str(out), *options]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and (out / "chat_template.jinja").exists()
    rows = _rows(str(out))
    model, theirs = _theirs(str(out), rows)  # an int8 folder: compressed-tensors' own decompressor
    assert type(model).__name__.lower().startswith(family)
    ours = _ours(str(out), rows, (1, 1, 1))
    for i, r in enumerate(rows):
        np.testing.assert_allclose(ours[i, :len(r)], theirs[i], rtol=1e-4, atol=1e-4)
    return config


@pytest.mark.parametrize("family", [pytest.param(f, marks=[] if f == "llama" else pytest.mark.slow) for f in FAMILIES])
def test_a_fine_tune_from_the_folder_exports_back_to_the_same_family(folders, family, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl")
    assert _fine_tune(folders[family], tmp_path / "run", corpus) == 0
    config = _export_equals_transformers(tmp_path / "run", tmp_path / "hf", family)
    source = json.loads(open(os.path.join(folders[family], "config.json")).read())
    # the source's own fields come back: its spelling, its token ids, its context length
    assert config["max_position_embeddings"] == source["max_position_embeddings"] == 128
    assert ("rope_scaling" in config) == ("rope_scaling" in source) and config["eos_token_id"] == source["eos_token_id"]
    assert config["tie_word_embeddings"] == source["tie_word_embeddings"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_on_two_stages_exports_half_zero_kernels_and_dense_embeddings(folders, family, tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl")
    assert _fine_tune(folders[family], tmp_path / "run", corpus, "mesh.data=1", "mesh.stage=2", "pipeline.microbatches=2",
                      "prune.sparsity=0.5", "prune.schedule=oneshot") == 0
    _export_equals_transformers(tmp_path / "run", tmp_path / "hf", family)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="numpy") as f:
        for key in f.keys():
            zeros = float(np.mean(f.get_tensor(key) == 0))
            if key.endswith(tuple(f"{k}.weight" for k in KERNELS)):
                assert zeros == 0.5, key
            elif key in ("model.embed_tokens.weight", "lm_head.weight"):
                assert zeros == 0, key
    # int8 for vLLM, every family: transformers dequantizes it as we do; a tied output layer stays float
    need("compressed_tensors", "compressed-tensors is what transformers reads an int8 export with")
    config = _export_equals_transformers(tmp_path / "run", tmp_path / "int8", family, "--quant", "int8")
    assert config["quantization_config"]["format"] == "int-quantized"
    assert ("lm_head" in config["quantization_config"]["ignore"]) == config["tie_word_embeddings"]


def _edited(folders, tmp_path, family, **changes):
    """A copy of a family's folder with config.json fields changed (None: removed)."""
    path = tmp_path / family
    shutil.copytree(folders[family], path)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


@pytest.mark.parametrize("family, changes, message", [
    ("llama", {"model_type": "gemma"}, 'model_type="gemma" is not one of the families'),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling rope_type='yarn' is not supported"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ("llama", {"attention_bias": True}, "attention_bias=true is not supported"),
    ("mistral", {"hidden_act": "gelu"}, 'hidden_act="gelu" is not supported'),
    ("llama", {"rope_scaling": {"rope_type": "llama3"}}, "a field is missing or of an unexpected form (KeyError"),
    ("qwen3", {"rope_parameters": "fast"}, "a field is missing or of an unexpected form"),
])
def test_a_field_the_model_cannot_honour_is_one_line(folders, tmp_path, capsys, family, changes, message):
    path = _edited(folders, tmp_path, family, **changes)
    assert _fine_tune(path, tmp_path / "run", write_jsonl(tmp_path / "c.jsonl")) == 2
    err = capsys.readouterr().err
    assert message in err and "config.json" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        pretrained.from_pretrained(str(path))


def test_user_mistakes_with_a_folder_are_one_line(folders, tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl")
    cases = [(["model.n_heads=8"], "model.n_heads=8 disagrees with"),
             (["data.tokenizer=bpe:300"], "data.tokenizer=bpe:300 disagrees with checkpoint.init_from="),
             (["model.seq_len=256"], "model.seq_len=256 is above")]
    for extra, message in cases:
        assert _fine_tune(folders["qwen3"], tmp_path / "run", corpus, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    own = tmp_path / "own.yaml"  # a key in the user's own YAML counts as theirs; the shipped defaults give way
    own.write_text("model:\n  n_kv_heads: 4\n")
    assert cli.main(["--config", str(own), f"checkpoint.init_from={folders['qwen3']}", f"data.path={corpus}"]) == 2
    assert "model.n_kv_heads=4 disagrees with" in capsys.readouterr().err
    assert cli.main(["--print-config", f"checkpoint.init_from={folders['qwen3']}"]) == 0
    printed = capsys.readouterr().out
    assert "head_dim: 32" in printed and "qk_norm: true" in printed and "family: qwen3" in printed
    bare = tmp_path / "bare"
    shutil.copytree(folders["qwen3"], bare)
    os.remove(bare / "tokenizer.json")
    assert _fine_tune(bare, tmp_path / "run", corpus) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    with pytest.raises(UserError, match="no tokenizer.json .*save_pretrained"):
        pretrained.from_pretrained(str(bare))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_bfloat16_folder_loads(folders, tmp_path):
    import torch
    import transformers
    path = str(tmp_path / "bf16")
    transformers.AutoModelForCausalLM.from_pretrained(folders["qwen3"]).to(torch.bfloat16).save_pretrained(path)
    shutil.copy(os.path.join(folders["qwen3"], "tokenizer.json"), path)
    rows = _rows(path)
    _, theirs = _theirs(path, rows)  # bf16 weights, upcast to float32 on both sides: the same numbers
    ours = _ours(path, rows, (1, 1, 1))
    for i, r in enumerate(rows):
        np.testing.assert_allclose(ours[i, :len(r)], theirs[i], rtol=1e-4, atol=1e-4)
    model, _ = pretrained.from_pretrained(path, dtype="bfloat16")
    assert model.embed[...].dtype == jax.numpy.bfloat16


def test_fewer_kv_heads_than_the_tensor_axis_are_replicated_and_equal(folders, caplog):
    """2 KV heads on a tensor axis of 4: every device holds both (said once), the query heads stay split."""
    import logging
    rows = _rows(folders["qwen3"])
    one = _ours(folders["qwen3"], rows, (1, 1, 1))
    with caplog.at_level(logging.INFO, logger="jaxinfra.models.factory"):
        wide = _ours(folders["qwen3"], rows, (2, 1, 4))
    assert "model.n_kv_heads=2 does not split 4 ways" in caplog.text
    for i, r in enumerate(rows):
        np.testing.assert_allclose(wide[i, :len(r)], one[i, :len(r)], rtol=1e-5, atol=1e-5)


def test_train_flops_count_kv_heads_head_size_and_a_tied_table():
    from jaxinfra.models.transformer import train_flops_per_token
    from jaxinfra.settings.model import ModelConfig
    D, H, G, K, F, V, L, T = 64, 4, 2, 24, 96, 300, 2, 32
    cfg = ModelConfig(d_model=D, n_heads=H, n_kv_heads=G, head_dim=K, d_ff=F, vocab_size=V, n_layers=L, seq_len=T,
                      tie_embeddings=True)
    per_layer = D * H * K * 2 + D * G * K * 2 + 3 * D * F  # q and o, k and v, the MLP
    assert train_flops_per_token(cfg) == 6 * (L * per_layer + D * V) + 6 * L * T * H * K
    dense = ModelConfig(d_model=D, n_heads=H, d_ff=F, vocab_size=V, n_layers=L, seq_len=T)
    assert train_flops_per_token(dense) == 6 * (L * (4 * D * D + 3 * D * F) + D * V) + 6 * L * T * D  # as before


def test_generate_py_decodes_a_folder(folders, capsys):
    assert cli.generate_main([folders["mistral"], "--prompt", "def f1", "--tokens", "8", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def f1") and "KV cache" in err
    assert cli.generate_main([folders["mistral"], "--step", "3"]) == 2
    assert "is a Hugging Face folder" in capsys.readouterr().err


@pytest.mark.slow
def test_from_pretrained_reads_a_folder_on_s3(folders, bucket):
    from jaxinfra.core import storage
    for name in os.listdir(folders["llama"]):
        storage.upload(os.path.join(folders["llama"], name), f"{bucket}/llama/{name}")
    rows = _rows(folders["llama"])
    here = _ours(folders["llama"], rows, (1, 1, 1))
    there = _ours(f"{bucket}/llama", rows, (1, 1, 1))
    np.testing.assert_array_equal(here, there)

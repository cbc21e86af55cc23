"""The Hugging Face Llama export of the default Transformer: names, shapes and config without torch;
logits, greedy decoding and the tokenizer in transformers when it is installed (the `[hf]` extra);
and the way back through checkpoint.init_from, bit for bit."""
import json
import shutil

import jax
import numpy as np
import pytest
from conftest import TINY, need, tiny_config
from flax import nnx

from jaxinfra import cli
from jaxinfra.ckpt import reader as ckpt_reader
from jaxinfra.core.errors import UserError
from jaxinfra.core.names import take, whole_layers
from jaxinfra.core.state import TrainState
from jaxinfra.data.tokenizer import bytes_tokenizer
from jaxinfra.export import safetensors as safetensors_lib
from jaxinfra.models import factory
from jaxinfra.models.sampling import sample
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.loading import load_config
from jaxinfra.train import warmstart
from jaxinfra.train.step import abstract_model

pytestmark = pytest.mark.xdist_group("test_hf")
LM = [*TINY, "model.seq_len=64", "model.n_heads=2", "run.steps=20", "checkpoint.export_format=hf"]


@pytest.fixture(scope="session")  # session: computed once per worker even if xdist interleaves modules
def exported(tmp_path_factory):
    """A tiny LM trained 20 steps (the run exports exports/hf-20/), exported by the script in shards of at most 40 kB."""
    d = tmp_path_factory.mktemp("hf")
    assert cli.main([*LM, f"run.dir={d / 'run'}"]) == 0
    assert cli.export_main([str(d / "run"), "--format", "hf", "--out", str(d / "hf"), "--max-shard-size", "40KB"]) == 0
    return d / "run", d / "hf"


def _model(run):
    """(module def, params on a one-axis mesh, the run's config) of a run's newest step."""
    cfg = load_config(str(run / "config.yaml"))
    mesh = make_mesh(-1, 1, 1)
    md = abstract_model(factory.model_fn(cfg, mesh))
    flat, _ = ckpt_reader.read_params(str(run))
    return md, shd.to_params(flat, md.params, shd.tree_shardings(md.logical, mesh, cfg.mesh.logical_rules)), \
        cfg, mesh


def test_names_shapes_dtypes_and_config(exported):
    run, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                   "num_hidden_layers", "vocab_size", "max_position_embeddings", "head_dim")} == \
        {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 64, "head_dim": 16}
    assert config["rope_theta"] == 10000.0 and config["rms_norm_eps"] == 1e-6 and config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is False
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    tensors = safetensors_lib.load(str(out / "model.safetensors.index.json"))
    ours, _ = ckpt_reader.read_params(str(run))
    assert len(tensors) == len(ours) == 2 * 9 + 3
    want = {"model.embed_tokens.weight": (256, 32), "lm_head.weight": (256, 32), "model.norm.weight": (32,),
            "model.layers.1.self_attn.q_proj.weight": (32, 32), "model.layers.1.self_attn.o_proj.weight": (32, 32),
            "model.layers.0.mlp.gate_proj.weight": (64, 32), "model.layers.0.mlp.down_proj.weight": (32, 64),
            "model.layers.0.input_layernorm.weight": (32,), "model.layers.0.post_attention_layernorm.weight": (32,)}
    for name, shape in want.items():
        assert tensors[name].shape == shape and tensors[name].dtype == np.float32, name
    np.testing.assert_array_equal(tensors["lm_head.weight"], ours["head"].T)
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.o_proj.weight"],
                                  ours["blocks.1.attn.wo"].reshape(32, 32).T)
    during = safetensors_lib.load(str(run / "exports" / "hf-20" / "model.safetensors"))  # written by the run itself
    assert sorted(during) == sorted(tensors) and all(np.array_equal(during[k], tensors[k]) for k in tensors)
    assert json.loads((run / "exports" / "hf-20" / "config.json").read_text()) == config
    tokenizer = json.loads((out / "tokenizer.json").read_text())
    assert sorted(tokenizer["model"]["vocab"].values()) == list(range(256))


def test_init_from_the_hf_folder_gives_every_parameter_back_bitwise(exported):
    run, out = exported
    cfg = tiny_config(*LM)
    mesh = make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        md = abstract_model(factory.model_fn(cfg, mesh))
        sh = TrainState(shd.replicated(mesh), shd.tree_shardings(md.logical, mesh, cfg.mesh.logical_rules), None,
                        shd.tree_shardings(md.state_logical, mesh, cfg.mesh.logical_rules))
        params, _, source = warmstart.load(str(out), md, sh)
    assert "a Hugging Face llama folder" in source
    ours, _ = ckpt_reader.read_params(str(run))
    back = {k: np.asarray(shd.gather(v)) for k, v in zip(
        [".".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]],
        jax.tree.leaves(params))}
    layers = whole_layers({k: v.shape for k, v in back.items()}, md.stacked, ".")  # the blocks are stacked
    back = {n: take(back[layer.stored], layer) for n, layer in layers.items()}
    assert sorted(back) == sorted(ours)
    for name in ours:
        np.testing.assert_array_equal(back[name], ours[name], err_msg=name)
    other = out.parent / "hf_8_heads"  # the same tensors described with another head split
    shutil.copytree(out, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "num_key_value_heads": 4}))
    with jax.set_mesh(mesh), pytest.raises(UserError, match="num_attention_heads=4 of head_dim=16, the model has 2 of 16"):
        warmstart.load(str(other), md, sh)


def test_a_model_that_is_not_a_llama_is_one_line(tmp_path, capsys):
    import optax
    from flax import nnx as fnnx

    import jaxinfra

    class Tiny(fnnx.Module):
        def __init__(self):
            self.w = fnnx.Param(jax.numpy.ones((4, 4)))

        def __call__(self, x):
            return x @ self.w[...]

    loss = lambda m, b: optax.l2_loss(m(b["x"])).mean()
    examples = [{"x": np.ones(4, np.float32)} for _ in range(32)]
    cfg = tiny_config(f"run.dir={tmp_path}", "checkpoint.export_format=hf", "mesh.data=8", "mesh.fsdp=1",
                      "mesh.tensor=1")
    with pytest.raises(UserError, match="checkpoint.export_format=hf: tensor w has no place in the Llama layout"):
        jaxinfra.train_model(cfg, Tiny, loss, examples)
    assert "compiled" not in capsys.readouterr().out


def test_transformers_loads_it_with_equal_logits_and_greedy_decoding(exported):
    torch = need("torch", "torch and transformers are the [hf] extra")
    transformers = need("transformers", "torch and transformers are the [hf] extra")
    run, out = exported
    model = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok("def f():")["input_ids"] == list(b"def f():") and tok.decode(list(b"x = 1")) == "x = 1"
    md, params, cfg, mesh = _model(run)
    tokens = np.asarray([list(b"import os\nprint(os.getcwd())\ndef main(argv):")[:40]] * 8, np.int32)
    prompt, n = list(b"def "), 50
    with torch.no_grad():
        theirs = model(torch.tensor(tokens[:1], dtype=torch.long)).logits[0].numpy()
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    greedy, scores = gen.sequences[0].tolist(), torch.stack(gen.scores)[:, 0].numpy()
    assert len(greedy) == len(prompt) + n and (scores.argmax(-1) == greedy[len(prompt):]).all()
    with jax.set_mesh(mesh):
        forward = jax.jit(lambda p, t: nnx.merge(md.eval_def, p)(t))
        ours = np.asarray(forward(params, tokens))[0]
        # their greedy path fed to our model: at each step, the logits it predicts the next byte from
        path = np.asarray(forward(params, np.asarray([greedy[:-1]] * 8, np.int32)))[0, len(prompt) - 1:]
        text = sample(md.eval_def, params, ["def "], n_tokens=n, seq_len=64, tokenizer=bytes_tokenizer(), temperature=0.0,
                      seed=0, mesh=mesh, rules=cfg.mesh.logical_rules)[0]
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)
    # Greedy choices are compared where their top-2 margin is clear: logits agree to ~1e-5, so a step whose two
    # best bytes are nearer than 1e-3 may pick either, and every byte after it then differs (a near tie, not a bug)
    top2 = np.sort(scores, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3
    assert clear.sum() >= n // 2, f"only {clear.sum()} of {n} greedy steps have a clear margin: nothing proven"
    np.testing.assert_array_equal(path.argmax(-1)[clear], np.asarray(greedy[len(prompt):])[clear])
    first_tie = int(np.argmin(clear)) if not clear.all() else n
    same = bytes(greedy[:len(prompt) + first_tie]).decode("utf-8", errors="replace")  # the prompt and its continuation
    # our sampler, up to the first tie (the last character of a cut prefix may be half of a UTF-8 sequence)
    assert text.startswith(same[:-1] if first_tie < n else same), (text, same)

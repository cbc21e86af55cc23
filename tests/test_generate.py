"""Sampling: batch-independent continuations, prompt checks."""
import jax
import pytest
from conftest import tiny_config

from jaxinfra.core.errors import UserError
from jaxinfra.data.tokenizer import bytes_tokenizer
from jaxinfra.models.sampling import prompt_ids, sample
from steps import make_setup, mesh_of


def test_greedy_continuation_does_not_depend_on_the_other_prompts():
    cfg = tiny_config()
    mesh = mesh_of((2, 2, 2))
    rules = {k: tuple(v) for k, v in cfg.mesh.rules.items()}
    with jax.set_mesh(mesh):
        setup, _, _ = make_setup(cfg, mesh)
        kw = dict(n_tokens=12, seq_len=16, tokenizer=bytes_tokenizer(), temperature=0.0, seed=0, mesh=mesh, rules=rules)
        alone = sample(setup.graphdef, setup.state.params, ["def "], **kw)
        batch = sample(setup.graphdef, setup.state.params, ["def ", "import ", "class "], **kw)
    assert batch[0] == alone[0]  # padding rows are copies, never aliases of prompt 0
    assert [t.encode("utf-8", "replace")[:len(p)] for t, p in zip(batch, ["def ", "import ", "class "])] == \
        [b"def ", b"import ", b"class "]


def test_prompt_ids_must_fit_the_vocabulary():
    assert prompt_ids("ab", bytes_tokenizer(), 256) == [97, 98]
    with pytest.raises(UserError, match="byte 97, outside the model's vocab_size=64"):
        prompt_ids("ab", bytes_tokenizer(), 64)
    with pytest.raises(UserError, match="empty"):
        prompt_ids("", bytes_tokenizer(), 256)

"""The rules table: logical names -> PartitionSpecs -> NamedShardings, and divisibility checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfra.core.errors import UserError
from jaxinfra.parallel import sharding as shd
from jaxinfra.parallel.mesh import make_mesh
from jaxinfra.settings.sections import DEFAULT_RULES

RULES = {k: tuple(v) for k, v in DEFAULT_RULES.items()}


def test_logical_to_spec_default_rules():
    assert shd.logical_to_spec(("embed", "mlp"), RULES) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "heads", "kv"), RULES) == P("fsdp", "tensor", None)
    assert shd.logical_to_spec(("batch", "seq"), RULES) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("norm",), RULES) == P(None)
    assert shd.logical_to_spec((None, "vocab"), RULES) == P(None, "tensor")


def test_a_mesh_axis_shards_one_dimension_only():
    rules = {"a": ("fsdp", "tensor"), "b": ("tensor",), "c": ("fsdp", "data")}
    assert shd.logical_to_spec(("a", "b"), rules) == P(("fsdp", "tensor"), None)
    assert shd.logical_to_spec(("b", "c"), rules) == P("tensor", ("fsdp", "data"))
    assert shd.logical_to_spec(("a", "c"), rules) == P(("fsdp", "tensor"), "data")


def test_unknown_logical_name_is_a_user_error():
    with pytest.raises(UserError, match="'pixels'.*mesh.rules.pixels"):
        shd.logical_to_spec(("pixels",), RULES)


def test_tree_shardings_and_shard_gather_round_trip():
    mesh = make_mesh(2, 2, 2)
    logical = {"w": P("embed", "mlp"), "b": P("norm"), "s": P()}
    sh = shd.tree_shardings(logical, mesh, RULES)
    assert sh["w"].spec == P("fsdp", "tensor") and sh["s"].spec == P()
    host = {"w": np.arange(32.0).reshape(4, 8), "b": np.ones(3), "s": np.float32(2)}
    placed = shd.shard(host, sh)
    assert placed["w"].addressable_shards[0].data.shape == (2, 4)
    back = shd.gather(placed)
    for k in host:
        np.testing.assert_array_equal(back[k], host[k])


def test_divisibility_errors_name_the_parameter_and_key():
    mesh = make_mesh(1, 4, 2)
    abstract = {"layer": {"w": jax.ShapeDtypeStruct((6, 8), jnp.float32)}}
    logical = {"layer": {"w": P("embed", "mlp")}}
    sh = shd.tree_shardings(logical, mesh, RULES)
    with pytest.raises(UserError) as e:
        shd.check_divisible(abstract, sh, logical)
    assert "parameter layer/w " in str(e.value) and "size 6" in str(e.value) and "'embed'" in str(e.value)
    with pytest.raises(UserError) as e:
        shd.check_logical_sizes({"heads": ("model.n_heads", 3)}, RULES, mesh)
    assert "model.n_heads=3" in str(e.value) and "mesh.tensor=2" in str(e.value)


def test_batch_spec_and_divisor():
    mesh = make_mesh(2, 2, 2)
    assert shd.batch_spec(RULES, 2) == P(("data", "fsdp"), None)
    assert shd.batch_spec(RULES, 3, leading=1) == P(None, ("data", "fsdp"), None)
    assert shd.batch_divisor(mesh, RULES) == 4


def test_logical_constraint_pins_activation_sharding():
    mesh = make_mesh(2, 2, 2)
    constrain = shd.LogicalConstraint(mesh, RULES)
    f = jax.jit(lambda x: constrain(x * 2, ("batch", "seq", "mlp")))
    y = f(jnp.ones((8, 4, 6)))
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")

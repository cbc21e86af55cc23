"""Mesh building, -1 filling, product checks and the description line."""
import jax
import pytest
from jax.sharding import AxisType

from jaxinfra.errors import UserError
from jaxinfra.mesh import AXES, describe, init_distributed, make_mesh, resolve_shape


@pytest.mark.parametrize("sizes, expect", [
    ((2, 2, 2), (2, 2, 2)), ((-1, 1, 1), (8, 1, 1)), ((1, -1, 2), (1, 4, 2)), ((2, 2, -1), (2, 2, 2)),
    ((1, 8, 1), (1, 8, 1)),
])
def test_make_mesh_fills_minus_one(sizes, expect):
    mesh = make_mesh(*sizes)
    assert mesh.axis_names == AXES
    assert tuple(mesh.shape[a] for a in AXES) == expect
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_mesh_over_a_subset_of_devices():
    mesh = make_mesh(-1, 2, 1, devices=jax.devices()[:4])
    assert mesh.shape["data"] == 2 and mesh.devices.size == 4


@pytest.mark.parametrize("sizes, words", [
    ({"data": 3, "fsdp": 2, "tensor": 2}, ["data=3", "12", "8"]),
    ({"data": -1, "fsdp": 3, "tensor": 1}, ["mesh.data=-1", "8", "3"]),
    ({"data": -1, "fsdp": -1, "tensor": 1}, ["-1"]),
])
def test_bad_mesh_sizes(sizes, words):
    with pytest.raises(UserError) as e:
        resolve_shape(sizes, 8)
    for w in words:
        assert w in str(e.value)


def test_describe_names_axes_devices_processes():
    line = describe(make_mesh(2, 2, 2))
    for w in ("data=2", "fsdp=2", "tensor=2", "8 cpu devices", "1 process"):
        assert w in line


def test_single_process_needs_no_distributed():
    assert init_distributed() is False
    with pytest.raises(UserError, match="process_id"):
        init_distributed("127.0.0.1:1234", 2, 5)

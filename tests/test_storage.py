"""Object storage: checkpoints, exports, logs and data on s3:// against moto's server on 127.0.0.1."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfra import checkpoint as ckpt_lib
from jaxinfra import storage
from jaxinfra.errors import UserError
from jaxinfra.step import TrainState


def _state(step):
    return TrainState(step=jnp.int32(step), params={"w": jnp.arange(12.0).reshape(3, 4) * step},
                      opt_state={"m": jnp.ones(4)})


def test_checkpointer_saves_rotates_and_restores_on_s3(bucket):
    ck = ckpt_lib.Checkpointer(storage.join(bucket, "run", "checkpoints"), keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step), {"step": step, "data": {"global_batches_consumed": step}})
    ck.wait()
    assert ck.steps() == [2, 3]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0))
    back = ckpt_lib.resume(ck, target)
    np.testing.assert_array_equal(back.params["w"], _state(3).params["w"])
    ck.close()
    assert ckpt_lib.complete_steps(storage.join(bucket, "run", "checkpoints")) == [2, 3]
    assert ckpt_lib.locate(storage.join(bucket, "run"))[1] == 3

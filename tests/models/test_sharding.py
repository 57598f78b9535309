"""A forward on 8 simulated CPU devices equals the single-device forward."""

import jax
import numpy as np
import pytest
from conftest import TINY
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pbbjax import load_model, make_mesh
from pbbjax.models.sharding import logical_to_spec


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (1, 2, 4), (8, 1, 1)])
def test_sharded_forward_equals_single_device(hf_dirs, shape):
    assert jax.device_count() == 8
    _, path = hf_dirs["llama_gqa"]
    single, _ = load_model(path)
    mesh = make_mesh(*shape)
    model, _ = load_model(path, mesh=mesh)
    ids = np.random.RandomState(0).randint(0, TINY["llama_gqa"]["vocab_size"], (8, 16)).astype(np.int32)
    batch = jax.device_put(ids, NamedSharding(mesh, logical_to_spec(("batch", None), ids.shape, mesh)))

    graphdef, state = nnx.split(model)
    out = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, batch)
    ref = np.asarray(single(ids))
    assert np.abs(np.asarray(out) - ref).max() <= 1e-5


def test_parameters_are_laid_out_by_the_rules(hf_dirs):
    _, path = hf_dirs["llama_gqa"]
    model, _ = load_model(path, mesh=make_mesh(2, 2, 2))
    q = model.layers.attn.q_proj[...]  # [layers, embed, q_heads, head_dim]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert model.embed[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert q.addressable_shards[0].data.shape == (2, 32, 4, 8)


def test_indivisible_axes_are_replicated_with_a_warning(hf_dirs, caplog):
    _, path = hf_dirs["smollm2_shaped"]  # 9 heads, 3 KV heads: not divisible by tensor=2
    model, _ = load_model(path, mesh=make_mesh(1, 4, 2))
    assert model.layers.attn.k_proj[...].sharding.spec[2] is None
    assert "'kv_heads' of size 3 is not divisible" in caplog.text
    assert model.layers.mlp.up_proj[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")


def test_make_mesh_sizes():
    assert dict(make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(2, 4, 2)
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(-1, -1, 2)

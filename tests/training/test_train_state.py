"""The train state's layout on a mesh: every optimizer moment has its parameter's sharding after init, after a
step and after a restore; the bytes per device are those of (params + moments) / devices; compile-only
(``pbbjax.training.aot``) builds exactly that state; weight decay applies to matrices only, by their logical
axes."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from pbbjax import load_model, make_mesh
from pbbjax.config.run_config import build_run_config
from pbbjax.config.schema import base_config, select_preset
from pbbjax.training import sft
from pbbjax.training.checkpoint import Checkpointer


def _moments_and_params(state):
    """(moment leaf, its parameter) pairs, matched by path: mu and nu mirror the params tree."""
    params = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    pairs = []
    for path, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]:
        key = jax.tree_util.keystr(path)
        match = [k for k in params if key.endswith(k)]
        if match:
            pairs.append((key, x, params[max(match, key=len)]))
    return pairs


def _bytes_per_device(tree) -> dict:
    per = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return per


def _assert_moments_follow_params(state):
    pairs = _moments_and_params(state)
    assert len(pairs) == 2 * len(jax.tree.leaves(state["params"]))  # mu and nu of every parameter
    for key, moment, param in pairs:
        assert moment.sharding.is_equivalent_to(param.sharding, param.ndim), key


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2)])
def test_moments_take_their_parameters_shardings_and_bytes_split_over_devices(hf_dirs, shape, tmp_path):
    model, _ = load_model(hf_dirs["llama_gqa"][1], mesh=make_mesh(*shape))
    mesh = model.mesh
    cfg = sft.OptimConfig(weight_decay=0.1)
    optimizer = sft.make_optimizer(cfg, 4)
    state = sft.init_state(model, optimizer, mesh)
    _assert_moments_follow_params(state)

    # bytes per device: (params + 2 moments) / devices within 10% (replicated norms and counters add a bit)
    params = sum(x.nbytes for x in jax.tree.leaves(state["params"]))
    per_device = _bytes_per_device(state)
    assert len(per_device) == 8
    for device, n in per_device.items():
        assert n <= 1.10 * 3 * params / 8, (device, n, 3 * params / 8)

    graphdef = nnx.split(model)[0]
    step = sft.make_train_step(graphdef, optimizer, cfg, 4, sft.state_shardings(state), mesh)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(1, 128, (8, 16)).astype(np.int32),
        "loss_mask": np.ones((8, 16), np.int32),
        "segment_ids": np.ones((8, 16), np.int32),
        "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
    }
    state, _ = step(state, jax.device_put(batch, sft.batch_sharding(mesh)))
    _assert_moments_follow_params(state)

    with Checkpointer(tmp_path, fingerprint={}, async_save=False) as ckpt:
        ckpt.save(1, state, {})
        restored, _, _ = ckpt.restore(sft.abstract_state(state["params"], optimizer, mesh))
    _assert_moments_follow_params(restored)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        assert a.sharding == b.sharding and np.array_equal(np.asarray(a), np.asarray(b))


def test_compile_only_builds_the_state_a_run_builds():
    """pbbjax.training.aot's abstract state for the tiny preset on this machine's 8 devices, against the
    state the runner's own calls (load_model on the mesh, sft.init_state) build: the same leaves, shapes,
    dtypes and shardings."""
    from pbbjax.models.tiny import tiny_model_dir
    from pbbjax.training import aot

    config = select_preset(base_config("proactive"), "tiny")
    config.mesh.update(dict(data=1, fsdp=4, tensor=2))
    ctx = aot.build_context(build_run_config(config), jax.devices())
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = tiny_model_dir(config.model.tiny.to_dict(), Path(d), seed=0)
        model, _ = load_model(path, mesh=make_mesh(1, 4, 2))
    real = sft.init_state(model, sft.make_optimizer(ctx.optim, 1000), model.mesh)
    flat = jax.tree_util.tree_flatten_with_path
    ours = [(jax.tree_util.keystr(p), x.shape, x.dtype, x.sharding.spec) for p, x in flat(ctx.state)[0]]
    theirs = [(jax.tree_util.keystr(p), x.shape, x.dtype, x.sharding.spec) for p, x in flat(real)[0]]
    assert ours == theirs


def test_weight_decay_skips_norms_and_biases_by_their_axes(hf_dirs):
    """Stacked norms ([layers, D]) and biases ([layers, heads, head_dim]) have a matrix's rank; decay must
    still leave them alone. Zero gradients isolate the decay term: decayed leaves move, others do not."""
    model, _ = load_model(hf_dirs["qwen2_tied"][1])  # q/k/v biases
    params = nnx.state(model)
    optimizer = sft.make_optimizer(
        sft.OptimConfig(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5), 1
    )
    updates, _ = optimizer.update(jax.tree.map(np.zeros_like, params), optimizer.init(params), params)
    moved = {
        jax.tree_util.keystr(p): bool(np.any(np.asarray(u) != 0))
        for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    stacked_norms = [k for k in moved if "norm" in k and "layers" in k]
    biases = [k for k in moved if "bias" in k]
    assert stacked_norms and biases
    assert not any(moved[k] for k in stacked_norms + biases + ["['final_norm'].value"]), moved
    matrices = [k for k in moved if "proj" in k or "embed" in k]
    assert matrices and all(moved[k] for k in matrices), moved
    assert optax.tree.norm(updates) > 0

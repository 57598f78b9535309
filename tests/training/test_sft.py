"""The SFT step: memorisation, exact gradient accumulation, sharded == single device, NaN handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pbbjax import load_model, make_mesh
from pbbjax.training.sft import (
    OptimConfig,
    batch_sharding,
    init_state,
    learning_rate_schedule,
    make_grad_fn,
    make_optimizer,
    make_train_step,
    masked_loss_sums,
    state_shardings,
)


def _batch(n=8, t=24, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (n, t)).astype(np.int32)
    loss_mask = np.zeros((n, t), np.int32)
    loss_mask[:, t // 2 :] = 1
    segment_ids = np.ones((n, t), np.int32)
    segment_ids[:, t - 4 :] = 2  # a second, short packed sequence at the end of each row
    loss_mask[:, t - 4] = 0  # its first token is a prompt token
    positions = np.concatenate([np.arange(t - 4), np.arange(4)])[None].repeat(n, 0).astype(np.int32)
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


def _run(path, cfg, batches, mesh=None, steps=None):
    model, _ = load_model(path, mesh=mesh)
    graphdef, _ = nnx.split(model)
    total = steps or len(batches)
    optimizer = make_optimizer(cfg, total)
    state = init_state(model, optimizer, mesh)
    step = make_train_step(graphdef, optimizer, cfg, total, state_shardings(state), mesh)
    losses = []
    for i in range(total):
        batch = jax.device_put(batches[i % len(batches)], batch_sharding(mesh))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_tiny_model_memorises_a_small_set(hf_dirs):
    cfg = OptimConfig(learning_rate=3e-3, warmup_steps=2, schedule="constant")
    _, losses = _run(hf_dirs["llama_gqa"][1], cfg, [_batch(4)], steps=60)
    assert losses[0] > 3.0 and losses[-1] < 0.05, losses[::10]


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_accumulating_k_microbatches_equals_one_batch(hf_dirs, mode):
    model, _ = load_model(hf_dirs["qwen2_tied"][1])
    graphdef, params = nnx.split(model)
    batch = _batch(8, seed=1)
    batch["loss_mask"][0, 12:16] = 0  # unequal completion lengths make the averaging matter
    loss1, count1, g1 = jax.jit(make_grad_fn(graphdef, mode, 1))(params, batch)
    loss4, count4, g4 = jax.jit(make_grad_fn(graphdef, mode, 4))(params, batch)
    # counts are integers, computed apart: completion tokens, or sequences with completion tokens
    targets = batch["loss_mask"][:, 1:]
    seqs = {
        (r, g) for r, g in zip(*np.nonzero(targets), strict=True) for g in [batch["segment_ids"][r, g + 1]]
    }
    assert int(count1) == int(count4) == (targets.sum() if mode == "token" else len(seqs)) == count1
    assert np.isclose(loss1, loss4, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        a, b = np.asarray(a), np.asarray(b)  # equal up to fp32 summation order: 1e-5 of the tensor's scale
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max() + 1e-12
    # and through the optimizer: the same losses step after step
    _, l1 = _run(hf_dirs["qwen2_tied"][1], OptimConfig(loss_mode=mode), [batch], steps=3)
    _, l4 = _run(hf_dirs["qwen2_tied"][1], OptimConfig(loss_mode=mode, microbatches=4), [batch], steps=3)
    assert np.allclose(l1, l4, rtol=1e-5)


@pytest.mark.parametrize(
    "model,axes",  # fsdp > 1: the full logits' loss; fsdp = 1: the chunked one, its vocabulary over tensor
    [("llama_gqa", (2, 2, 2)), ("llama_gqa", (2, 1, 4)), ("qwen2_tied", (2, 1, 4))],
)
def test_sharded_step_equals_single_device(hf_dirs, model, axes):
    """Three steps on a mesh equal three on one device (whose loss is the chunked cross-entropy)."""
    path = hf_dirs[model][1]
    batches = [_batch(8, seed=s) for s in range(3)]
    single, l1 = _run(path, OptimConfig(), batches)
    sharded, l8 = _run(path, OptimConfig(), batches, mesh=make_mesh(*axes))
    assert np.allclose(l1, l8, atol=1e-5)
    for a, b in zip(jax.tree.leaves(single["params"]), jax.tree.leaves(sharded["params"]), strict=True):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5


def test_loss_sums_by_hand():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    tokens = jnp.array([[0, 1, 0]])
    mask = jnp.array([[0, 1, 1]])
    seg = jnp.array([[1, 1, 1]])
    num, den = masked_loss_sums(logits, tokens, mask, seg, "token")
    assert np.isclose(num, -np.log(0.5) - np.log(0.25)) and den == 2
    tokens2 = jnp.array([[0, 1, 0, 1]])
    logits2 = jnp.log(jnp.array([[[0.5, 0.5], [0.2, 0.8], [0.3, 0.7], [0.5, 0.5]]]))
    mask2, seg2 = jnp.array([[0, 1, 0, 1]]), jnp.array([[1, 1, 2, 2]])
    num, den = masked_loss_sums(logits2, tokens2, mask2, seg2, "sequence")
    assert np.isclose(num / den, (-np.log(0.5) - np.log(0.7)) / 2) and den == 2


def test_non_finite_step_leaves_the_state_unchanged(hf_dirs):
    model, _ = load_model(hf_dirs["llama_gqa"][1])
    graphdef, _ = nnx.split(model)
    cfg = OptimConfig(learning_rate=1e38, max_grad_norm=0.0, warmup_steps=0, schedule="constant")
    optimizer = make_optimizer(cfg, 10)
    state = init_state(model, optimizer)
    step = make_train_step(graphdef, optimizer, cfg, 10, state_shardings(state), None)
    finite = []
    for _ in range(4):
        before = jax.tree.map(np.asarray, state["params"])
        state, metrics = step(state, _batch(4))
        finite.append(bool(metrics["finite"]))
        if not finite[-1]:
            after = jax.tree.map(np.asarray, state["params"])
            pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
            assert all(np.array_equal(a, b) for a, b in pairs)
            break
    assert not all(finite), "a learning rate of 1e38 must overflow"


@pytest.mark.slow
def test_smollm2_loss_decreases_over_20_steps(smollm2_dir):
    """The real 135M model on real PBB rows (arithmetic, stage 1 of proactive): 20 steps lower the loss."""
    from pbbjax.data.curriculum import CurriculumConfig, build_curriculum
    from pbbjax.data.pipeline import PipelineConfig, make_dataset, tokenize_rows
    from pbbjax.data.tasks.base import get_domain
    from pbbjax.models.hf_io import load_tokenizer

    rows = (
        build_curriculum(
            get_domain("arithmetic"),
            "proactive",
            CurriculumConfig(
                num_train_instructions=8, num_eval_instructions=2, decl_repeats=2, exec_per_instruction=2
            ),
        )
        .stages[0]
        .rows
    )
    examples = tokenize_rows(rows, load_tokenizer(smollm2_dir), 128)
    it = iter(make_dataset(examples, PipelineConfig(seq_len=128, batch_size=2, num_epochs=None)))
    batches = [next(it) for _ in range(5)]
    _, losses = _run(smollm2_dir, OptimConfig(learning_rate=1e-4, warmup_steps=2), batches, steps=20)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 3, 10])
@pytest.mark.parametrize("total", [1, 2, 3, 5, 40])
def test_no_stage_steps_at_learning_rate_zero(schedule, warmup, total):
    """Every step of a stage, however short against its warmup, trains: step i of a warmup of w steps (w at
    most the stage's length - 1) is at peak * (i + 1) / (w + 1), and the decay starts from the peak."""
    peak = 2e-4
    cfg = OptimConfig(learning_rate=peak, warmup_steps=warmup, schedule=schedule)
    lrs = np.array([float(learning_rate_schedule(cfg, total)(i)) for i in range(total)])
    w = min(warmup, total - 1)
    assert np.allclose(lrs[:w], peak * np.arange(1, w + 1) / (w + 1), rtol=1e-6)
    assert np.isclose(lrs[w], peak, rtol=1e-6)
    assert (lrs >= peak * min(1 / (w + 1), cfg.end_lr_ratio) * (1 - 1e-6)).all(), lrs


def test_a_stage_shorter_than_its_warmup_trains_from_its_first_step(hf_dirs):
    """Stage 2 of the CPU demo is 2 steps against a warmup of 3: both steps move the parameters."""
    model, _ = load_model(hf_dirs["llama_gqa"][1])
    graphdef, _ = nnx.split(model)
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=3)
    optimizer = make_optimizer(cfg, 2)
    state = init_state(model, optimizer)
    step = make_train_step(graphdef, optimizer, cfg, 2, state_shardings(state), None)
    lrs = []
    for _ in range(2):
        before = jax.tree.leaves(jax.tree.map(np.asarray, state["params"]))
        state, metrics = step(state, _batch(4))
        lrs.append(float(metrics["learning_rate"]))
        after = jax.tree.leaves(state["params"])
        assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert np.allclose(lrs, [5e-4, 1e-3], rtol=1e-6)

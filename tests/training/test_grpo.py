"""GRPO: its pure functions against hand-computed values, and learning on a toy task from a tiny model."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pbbjax import load_model
from pbbjax.training import sft
from pbbjax.training.grpo import (
    GRPOConfig,
    clipped_objective,
    group_advantages,
    kl_k3,
    make_logprob_fn,
    rollout_batch,
    token_weights,
)
from pbbjax.training.rollout import GRPOStepper, grpo_optimizer, prompt_indices


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0]
    a = np.asarray(group_advantages(rewards, 4, eps=0.0 + 1e-12))
    np.testing.assert_allclose(a[:4], [1, -1, -1, 1], atol=1e-6)  # mean 0.5, population std 0.5
    np.testing.assert_allclose(a[4:8], 0.0)  # equal rewards carry no signal
    std = math.sqrt((2.25**2 + 3 * 0.75**2) / 4)
    np.testing.assert_allclose(a[8:], [2.25 / std, -0.75 / std, -0.75 / std, -0.75 / std], rtol=1e-5)
    unscaled = np.asarray(group_advantages(rewards, 4, scale=False))
    np.testing.assert_allclose(unscaled[8:], [2.25, -0.75, -0.75, -0.75], rtol=1e-6)


def test_clipped_objective_by_hand():
    ratios = np.array([1.5, 0.5, 0.5, 1.5, 1.25, 1.0])
    adv = np.array([1.0, 1.0, -1.0, -1.0, 1.0, 2.0])
    loss, ratio, clipped = clipped_objective(jnp.log(ratios), jnp.zeros(6), adv, 0.2, 0.28)
    np.testing.assert_allclose(ratio, ratios, rtol=1e-6)
    # -min(rA, clip(r, 0.8, 1.28) A)
    np.testing.assert_allclose(loss, [-1.28, -0.5, 0.8, 1.5, -1.25, -2.0], rtol=1e-6)
    assert np.asarray(clipped).tolist() == [True, False, True, False, False, False]
    loss, _, clipped = clipped_objective(jnp.log(ratios), jnp.zeros(6), adv, 0.2, 0.2)
    np.testing.assert_allclose(np.asarray(loss)[[0, 4]], [-1.2, -1.2], rtol=1e-6)
    assert bool(clipped[4])


def test_k3_kl_by_hand_and_its_expectation_is_the_kl():
    np.testing.assert_allclose(kl_k3(jnp.log(0.5), jnp.log(0.25)), 0.5 + math.log(2) - 1, rtol=1e-6)
    assert float(kl_k3(jnp.log(0.3), jnp.log(0.3))) == 0.0
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    expected = float(np.sum(p * np.log(p / q)))  # KL(p || q)
    got = float(np.sum(p * np.asarray(kl_k3(jnp.log(p), jnp.log(q)))))  # E_{x ~ p}[k3]
    assert got == pytest.approx(expected, rel=1e-5)


def test_token_weights_by_mode():
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(token_weights(mask, "token", 4), mask / 6)
    np.testing.assert_allclose(token_weights(mask, "sequence", 4), [[0.25, 0.25, 0, 0], [0.125] * 4])
    np.testing.assert_allclose(token_weights(mask, "fixed", 4), mask / 8)
    for mode in ("token", "sequence"):
        assert float(jnp.sum(token_weights(mask, mode, 4))) == pytest.approx(1.0)


def test_rollout_batch_layout():
    b = rollout_batch([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0, max_new_tokens=3)
    p = 16  # prompts are padded to a power of two (at least 16)
    assert b["tokens"].shape == (2, p + 3)
    assert b["tokens"][0, p - 2 :].tolist() == [5, 6, 1, 2, 3]
    assert b["tokens"][1, p - 1 : p + 1].tolist() == [7, 4]
    assert b["attention_mask"][1].tolist() == [0] * (p - 1) + [1, 1, 0, 0]
    # completion_mask[t] = 1 when token t + 1 is a completion token
    assert b["completion_mask"][0].tolist() == [0] * (p - 1) + [1, 1, 1]
    assert b["completion_mask"][1].tolist() == [0] * (p - 1) + [1, 0, 0]


def test_logprobs_match_an_independent_softmax(hf_dirs):
    model, _ = load_model(hf_dirs["llama_gqa"][1])
    graphdef, params = nnx.split(model)
    b = rollout_batch([[5, 6, 7]], [[9, 10]], pad_id=0, max_new_tokens=2)
    got = np.asarray(make_logprob_fn(graphdef, 0.7, 2)(params, b))
    logits = np.asarray(model(np.asarray([[5, 6, 7, 9, 10]])))[0].astype(np.float64) / 0.7
    ref = logits - logits.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    p = b["tokens"].shape[1] - 2 - 3  # left padding
    for t, token in zip((2, 3), (9, 10), strict=True):  # positions 2 and 3 predict the completion tokens
        assert got[0, p + t] == pytest.approx(ref[t, token], abs=1e-4)
    assert b["completion_mask"][0, p + 2] == 1 and b["completion_mask"][0, p + 3] == 1
    assert not got[0, : p + 2].any()  # prompt targets: no log-probs computed


def test_logprobs_run_the_head_over_completion_positions_only(hf_dirs):
    """A 13-token prompt bucket of 16 and 3 new tokens: the LM head's logits are [B, 3, vocab], never
    [B, 19, vocab] (jaxpr shapes), and the log-probs equal those of the whole row's logits."""
    model, _ = load_model(hf_dirs["llama_gqa"][1])
    graphdef, params = nnx.split(model)
    b = rollout_batch([list(range(3, 16)), [4, 5]], [[20, 21, 22], [23]], pad_id=0, max_new_tokens=3)
    fn = make_logprob_fn(graphdef, 1.0, 3)
    vocab = model.cfg.vocab_size
    text = str(jax.make_jaxpr(fn)(params, b))  # nested jaxprs included
    lengths = {int(n) for n in re.findall(rf"f32\[2,(\d+),{vocab}\]", text)}
    assert lengths == {3}
    got = np.asarray(fn(params, b))
    logits = np.asarray(model(b["tokens"], attention_mask=b["attention_mask"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ref = np.take_along_axis(logp[:, :-1], b["tokens"][:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(got[:, -3:], ref[:, -3:], atol=1e-4)


def test_prompt_indices_cover_every_prompt_each_pass():
    seen = [prompt_indices(10, 5, step, seed=3) for step in range(4)]
    assert sorted(seen[0] + seen[1]) == list(range(10))
    assert sorted(seen[2] + seen[3]) == list(range(10))
    assert seen[0] + seen[1] != seen[2] + seen[3]  # a new permutation per pass
    assert prompt_indices(10, 5, 1, seed=3) == seen[1]


def test_config_errors():
    with pytest.raises(ValueError, match="rl.loss_agg"):
        GRPOConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GRPOConfig(temperature=0.0)
    with pytest.raises(ValueError, match="rl.sft_warmup_steps must be >= 0"):
        GRPOConfig(sft_warmup_steps=-1)


LOW = 64  # toy reward: the fraction of completion tokens below this id (chance 0.5 on a 128-token vocab)


def _toy_reward(tasks, completions):
    r = np.array([np.mean(np.asarray(c) < LOW) for c in completions])
    return r, {"correct": r.mean()}


def _toy(hf_dirs, cfg, steps, mesh=None, state=None, start=0):
    model, _ = load_model(hf_dirs["llama_gqa"][1], mesh=mesh)
    graphdef = nnx.split(model)[0]
    optimizer, schedule = grpo_optimizer(sft.OptimConfig(warmup_steps=0, schedule="constant"), cfg, steps)
    ref = jax.tree.map(jnp.copy, nnx.state(model)) if cfg.beta else None  # the stage's start
    state = state or sft.init_state(model, optimizer, mesh)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 128, size=n).tolist() for n in (3, 5, 7, 4)]
    stepper = GRPOStepper(
        graphdef,
        cfg,
        optimizer,
        schedule,
        sft.state_shardings(state),
        mesh,
        prompts=prompts,
        reward_fn=_toy_reward,
        eos_ids=(-1,),
        pad_id=0,
        seed=7,
        ref_params=ref,
    )
    history = []
    for step in range(start, steps):
        state, metrics, _ = stepper(state, step)
        history.append(metrics)
    return state, history


TOY = GRPOConfig(num_generations=8, prompts_per_step=2, max_new_tokens=6, learning_rate=1e-2, steps=12)


def test_grpo_raises_the_reward_of_a_toy_task(hf_dirs):
    _, history = _toy(hf_dirs, TOY, TOY.steps)
    rewards = [m["reward"] for m in history]
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    print(f"\ntoy reward: first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert last >= first + 0.2, rewards
    for m in history:
        assert m["logp_gap"] < 1e-3, "the sampler's and the trainer's log-probs agree"
        assert 0.0 <= m["clip_fraction"] <= 1.0 and abs(m["ratio"] - 1.0) < 1e-3  # μ = 1: ratio 1


def test_grpo_with_kl_and_inner_updates_and_a_resume_is_deterministic(hf_dirs):
    cfg = GRPOConfig(
        num_generations=4,
        prompts_per_step=2,
        max_new_tokens=4,
        learning_rate=3e-3,
        beta=0.1,
        num_iterations=2,
    )
    full, history = _toy(hf_dirs, cfg, 4)
    assert history[-1]["kl"] > 0 and any(m["clip_fraction"] > 0 or m["ratio"] != 1 for m in history)
    # Steps 0-1, then a fresh stepper continuing at step 2 from that state (as after a restart).
    half, _ = _toy(hf_dirs, cfg, 2)
    resumed, _ = _toy(hf_dirs, cfg, 4, state=half, start=2)
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(resumed["params"]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_grpo_on_a_mesh_matches_one_device(hf_dirs):
    from pbbjax import make_mesh

    cfg = GRPOConfig(num_generations=4, prompts_per_step=2, max_new_tokens=4, learning_rate=3e-3)
    one, h1 = _toy(hf_dirs, cfg, 2)
    sharded, h8 = _toy(hf_dirs, cfg, 2, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    assert [m["reward"] for m in h1] == [m["reward"] for m in h8]  # the same rollouts
    for m1, m8 in zip(h1, h8, strict=True):
        assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7)
        assert m8["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    # Adam divides by the gradient's running RMS, so where a gradient is ~0, float summation-order noise
    # moves the update by a visible fraction of the learning rate (3e-3): compare at 1e-4.
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(sharded["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_rollouts_end_with_the_eos_token_the_policy_sampled(hf_dirs):
    """With several EOS ids (Llama 3 Instruct: <|eot_id|> and <|end_of_text|>), a rollout that ended is
    trained on the EOS it sampled, not on the first id of the list. Near-greedy sampling makes the sampled
    token the argmax of an independent full forward pass over the prompt and the completion before it."""
    model, _ = load_model(hf_dirs["llama_gqa"][1])
    graphdef, params = nnx.split(model)
    eos_ids = tuple(range(1, 64))  # about half the vocabulary: rows end within a few tokens
    cfg = GRPOConfig(num_generations=2, prompts_per_step=4, max_new_tokens=6, temperature=1e-4)
    optimizer, schedule = grpo_optimizer(sft.OptimConfig(), cfg, 1)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(64, 128, size=n).tolist() for n in (3, 5, 7, 4)]
    stepper = GRPOStepper(
        graphdef, cfg, optimizer, schedule, None, None, prompts=prompts, reward_fn=None, eos_ids=eos_ids,
        pad_id=0, seed=3,
    )  # fmt: skip
    tasks, completions, logps = stepper.rollout(params, 0)
    ended = [(t, c) for t, c, lp in zip(tasks, completions, logps, strict=True) if len(c) == len(lp) + 1]
    assert len({c[-1] for _, c in ended}) > 1, "several different EOS tokens were sampled"
    for task, completion in ended:
        ids = np.asarray([prompts[task] + completion[:-1]], np.int32)
        expected = int(np.argmax(np.asarray(model(ids))[0, -1]))
        assert completion[-1] == expected in eos_ids

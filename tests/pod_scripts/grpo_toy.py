"""GRPO on a toy reward, on whatever pod this process belongs to (``python -m pbbjax.local_pod``): three
iterations of ``GRPOStepper`` over the tiny model in ``argv[1]``, on a mesh of every device of every host;
process 0 writes the rewards and the final parameters to ``argv[2]`` (an .npz file)."""

import sys

import jax
import numpy as np
from flax import nnx

from pbbjax import load_model, make_mesh
from pbbjax.core.distributed import initialize
from pbbjax.models.sharding import to_host
from pbbjax.training import sft
from pbbjax.training.grpo import GRPOConfig
from pbbjax.training.rollout import GRPOStepper, grpo_optimizer

LOW = 64


def toy_reward(tasks, completions):
    """The fraction of completion tokens below id 64: a reward a random model earns half of."""
    r = np.array([np.mean(np.asarray(c) < LOW) for c in completions])
    return r, {"correct": r.mean()}


def main(model_dir: str, out: str) -> None:
    initialize("auto")
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    model, _ = load_model(model_dir, mesh=mesh)
    cfg = GRPOConfig(num_generations=4, prompts_per_step=4, max_new_tokens=5, learning_rate=3e-3, steps=3)
    optimizer, schedule = grpo_optimizer(sft.OptimConfig(warmup_steps=0, schedule="constant"), cfg, cfg.steps)
    state = sft.init_state(model, optimizer, mesh)
    rng = np.random.default_rng(0)
    stepper = GRPOStepper(
        nnx.split(model)[0], cfg, optimizer, schedule, sft.state_shardings(state), mesh,
        prompts=[rng.integers(0, 128, size=n).tolist() for n in (3, 5, 7, 4, 6)],
        reward_fn=toy_reward, eos_ids=(1,), pad_id=0, seed=7,
    )  # fmt: skip
    rewards = []
    for step in range(cfg.steps):
        state, metrics, _ = stepper(state, step)
        rewards.append(metrics["reward"])
    flat = {jax.tree_util.keystr(p): to_host(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    if jax.process_index() == 0:
        np.savez(out, rewards=np.array(rewards), **flat)


if __name__ == "__main__":
    main(*sys.argv[1:3])

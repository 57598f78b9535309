"""GRPO iterations: which prompts each step uses, rollouts from the sampler, rewards, and the updates.

``GRPOStepper(state, step) -> (state, metrics, tokens)`` is one GRPO iteration, with the same shape as the
runner's SFT step, so the runner's loop (logging, checkpoints, evaluation, resume) serves both. Everything a
step does is a function of the step index and the seed: the prompts (seeded permutations of the stage's
prompts, one per pass), the rollout seed, hence a resumed run repeats the uninterrupted one. The sampler runs
on the parameters being trained (no copy); rollouts and updates alternate on one mesh.

Rewards (``text_reward_fn``): the domain's score of the answer extracted from each decoded completion
(1 correct / 0 not), plus ``format_reward`` when the completion contains the answer marker. Any
``reward_fn(task_indices, completions) -> rewards`` can be used instead (the tests use a toy one).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from pbbjax.core.seeds import derive_seed
from pbbjax.data.formatting import Row
from pbbjax.data.tasks.base import ANSWER_MARKER, Domain, Instruction, extract_answer
from pbbjax.eval.harness import row_example
from pbbjax.inference.sampler import generate_arrays
from pbbjax.models.sharding import to_host
from pbbjax.training import sft
from pbbjax.training.grpo import GRPOConfig, group_advantages, make_grpo_step, make_logprob_fn, rollout_batch


def grpo_optimizer(optim: sft.OptimConfig, cfg: GRPOConfig, steps: int):
    """The optimizer of a GRPO stage: train's AdamW settings at ``rl.learning_rate``, scheduled over every
    update (``steps * num_iterations``); also returns that schedule."""
    optim = dataclasses.replace(optim, learning_rate=cfg.learning_rate, microbatches=1)
    total = steps * cfg.num_iterations
    return sft.make_optimizer(optim, total), sft.learning_rate_schedule(optim, total)


def prompt_indices(num_prompts: int, per_step: int, step: int, seed: int) -> list[int]:
    """The prompts of iteration ``step``: consecutive slices of seeded permutations (a new one per pass)."""
    out = []
    for j in range(step * per_step, (step + 1) * per_step):
        order = np.random.default_rng(derive_seed(seed, "rl-prompts", j // num_prompts)).permutation(
            num_prompts
        )
        out.append(int(order[j % num_prompts]))
    return out


def text_reward_fn(
    tokenizer, domain: Domain, instructions: dict[str, Instruction], rows: list[Row], fmt: float
):
    """reward_fn for execution rows: the domain's score of each decoded completion, + ``fmt`` if it has the
    answer marker. Returns (rewards, {"correct": mean score, "formatted": fraction with the marker})."""

    def reward_fn(tasks: list[int], completions: list[list[int]]):
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        correct = np.array(
            [
                float(
                    domain.score(
                        instructions[rows[i].instruction_id], row_example(rows[i]), extract_answer(t)
                    )
                )
                for i, t in zip(tasks, texts, strict=True)
            ]
        )
        formatted = np.array([float(ANSWER_MARKER in t) for t in texts])
        return correct + fmt * formatted, {"correct": correct.mean(), "formatted": formatted.mean()}

    return reward_fn


class GRPOStepper:
    """One GRPO iteration per call; ``prompts`` are token lists (chat-formatted), ``reward_fn`` scores
    completions of ``prompts[task]``."""

    def __init__(
        self,
        graphdef,
        cfg: GRPOConfig,
        optimizer,
        schedule,
        shardings,
        mesh,
        *,
        prompts: list[list[int]],
        reward_fn,
        eos_ids: tuple[int, ...],
        pad_id: int,
        seed: int,
        ref_params=None,
    ):
        if cfg.beta and ref_params is None:
            raise ValueError("rl.beta > 0 needs the reference parameters")
        shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
        if (cfg.prompts_per_step * cfg.num_generations) % shards:
            raise ValueError(
                f"rl.prompts_per_step * rl.num_generations = {cfg.prompts_per_step * cfg.num_generations} "
                f"rollouts cannot be split over the mesh's data x fsdp = {shards} devices"
            )
        self.graphdef, self.cfg, self.mesh = graphdef, cfg, mesh
        self.prompts, self.reward_fn = prompts, reward_fn
        self.eos_ids, self.pad_id, self.seed = tuple(eos_ids), pad_id, seed
        self.ref_params = ref_params
        self.update = make_grpo_step(graphdef, optimizer, cfg, schedule, shardings, mesh)
        self.logprobs = jax.jit(make_logprob_fn(graphdef, cfg.temperature, cfg.max_new_tokens))
        self.sharding = sft.batch_sharding(mesh)  # [B, T] arrays; [B] ones shard their batch axis alike
        self.row_sharding = (
            self.sharding if mesh is None else NamedSharding(mesh, PartitionSpec(self.sharding.spec[0]))
        )

    def rollout(self, params, step: int):
        cfg = self.cfg
        tasks = prompt_indices(len(self.prompts), cfg.prompts_per_step, step, self.seed)
        g = generate_arrays(
            nnx.merge(self.graphdef, params),
            [self.prompts[t] for t in tasks],
            cfg.max_new_tokens,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            n=cfg.num_generations,
            seed=derive_seed(self.seed, "rollout", step) % 2**31,
            max_prompt_len=cfg.max_prompt_len,
        )
        # The sampler drops the EOS; the policy must learn to stop, so the EOS it sampled is trained on.
        completions = [
            row[:k].tolist() + ([int(e)] if e >= 0 else [])
            for row, k, e in zip(g.tokens, g.lengths, g.eos, strict=True)
        ]
        sampler_logps = [row[:k].tolist() for row, k in zip(g.logprobs, g.lengths, strict=True)]
        return [t for t in tasks for _ in range(cfg.num_generations)], completions, sampler_logps

    def __call__(self, state, step: int):
        cfg = self.cfg
        t0 = time.perf_counter()
        tasks, completions, sampler_logps = self.rollout(state["params"], step)
        t1 = time.perf_counter()
        rewards, reward_metrics = self.reward_fn(tasks, completions)
        batch = rollout_batch([self.prompts[t] for t in tasks], completions, self.pad_id, cfg.max_new_tokens)
        batch["advantages"] = np.asarray(group_advantages(rewards, cfg.num_generations, cfg.scale_rewards))
        completion_mask = batch["completion_mask"]
        batch = {
            k: jax.device_put(v, self.sharding if v.ndim > 1 else self.row_sharding) for k, v in batch.items()
        }
        old = self.logprobs(state["params"], batch)
        batch["old_logp"] = old
        batch["ref_logp"] = self.logprobs(self.ref_params, batch) if cfg.beta else old
        metrics = {}
        for _ in range(cfg.num_iterations):
            state, metrics = self.update(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        lengths = np.array([len(c) for c in completions])
        metrics |= {
            "reward": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            **{k: float(v) for k, v in reward_metrics.items()},
            "completion_length": float(lengths.mean()),
            "logp_gap": self._gap(to_host(old), completion_mask, sampler_logps),
            "rollout_s": t1 - t0,
            "update_s": time.perf_counter() - t1,
        }
        return state, metrics, int(lengths.sum())

    @staticmethod
    def _gap(trainer_logps, completion_mask, sampler_logps) -> float:
        """Mean |sampler - trainer| log-prob over the sampled tokens (the EOS, absent from the sampler's
        lists, is left out)."""
        mask = completion_mask.astype(bool)
        gaps = []
        for row, m, s in zip(trainer_logps, mask, sampler_logps, strict=True):
            trainer = row[m][: len(s)]
            gaps.append(np.abs(trainer - np.asarray(s[: len(trainer)])))
        flat = np.concatenate(gaps) if gaps else np.zeros(0)
        return float(flat.mean()) if flat.size else 0.0

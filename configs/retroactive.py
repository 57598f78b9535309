"""Retroactive PBB: stage 1 = declarative examples of all instructions; stage 2 = execution of train
instructions, by SFT (the default presets) or by GRPO (the ``rl`` presets). Eval-instruction accuracy is
tracked through stage 2 (``train.eval_every``), the paper's Fig. 3 upper right.

    python -m pbbjax.train --config configs/retroactive.py[:preset]

Presets: those of every config (``cpu``, ``tiny``, a paper-scale model, each optionally ``,<mesh>``), and
``rl`` (the CPU study size with GRPO in stage 2), ``rl-demo`` (the main job's programs, GRPO after 10 SFT
steps that teach the answer format: ``rl.sft_warmup_steps``), ``rl-tiny`` (a tiny random model, for tests)
and ``rl-<model>`` (a paper-scale model with GRPO, e.g. ``rl-qwen3-4b,v5p-8``).
"""

import dataclasses

from pbbjax.config.schema import Preset, base_config, select_preset


def _grpo(c, scale: str) -> None:
    c.rl.stages = ("stage2",)
    if scale == "tiny":
        c.rl.update(
            dict(num_generations=4, prompts_per_step=2, max_new_tokens=8, learning_rate=1e-3, steps=4)
        )
        c.train.eval_every = 2
    elif scale == "demo":  # the main job's programs: CoT traces of about 35 tokens, after an SFT warm start
        c.rl.update(
            dict(
                num_generations=4,
                prompts_per_step=4,
                max_new_tokens=48,
                learning_rate=2e-5,
                steps=30,
                sft_warmup_steps=10,
            )
        )
        c.train.eval_every = 10
    elif scale == "cpu":
        c.rl.update(
            dict(num_generations=4, prompts_per_step=4, max_new_tokens=12, learning_rate=1e-5, steps=30)
        )
        c.train.eval_every = 10
    else:  # paper scale: G = 8 CoT rollouts for each of 32 prompts per step (Qwen3 needs no warm-up)
        c.rl.update(
            dict(num_generations=8, prompts_per_step=32, max_new_tokens=512, learning_rate=1e-6, steps=200)
        )
        c.train.eval_every = 20


def get_config(preset: str | None = None):
    p = Preset.parse(preset, default="cpu")
    c = select_preset(base_config("retroactive"), dataclasses.replace(p, rl=False))
    if p.rl:
        _grpo(c, p.size)
    return c

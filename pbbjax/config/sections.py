"""Typed sections of a run's config that the training layer reads: the optimizer (``train.*``), GRPO
(``rl.*``), Weights & Biases (``log.*``) and the profiler's window (``profile.steps``). Each checks its own
values when built."""

from __future__ import annotations

import dataclasses
import importlib
import re


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    end_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices only
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    microbatches: int = 1  # gradient accumulation: the batch is split into this many sequential parts
    loss_mode: str = "token"  # "token" | "sequence"

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"train.schedule {self.schedule!r} is not 'cosine', 'linear' or 'constant'")
        if self.loss_mode not in ("token", "sequence"):
            raise ValueError(f"train.loss_mode {self.loss_mode!r} is not 'token' or 'sequence'")
        if self.microbatches < 1:
            raise ValueError(f"train.microbatches must be >= 1, got {self.microbatches}")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    num_generations: int = 8  # G: completions per prompt
    prompts_per_step: int = 8  # prompts per iteration (a batch of prompts_per_step * G rollouts)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_prompt_len: int = 256  # rollout prompts longer than this (in tokens) are an error; bounds memory
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float = 0.2  # upper clip: ratio <= 1 + epsilon_high (DAPO's "clip higher" uses 0.28)
    beta: float = 0.0  # KL coefficient against the frozen reference (the stage's start); 0 = no reference
    num_iterations: int = 1  # μ: optimizer steps per batch of rollouts
    loss_agg: str = "token"  # "token" | "sequence" | "fixed"
    scale_rewards: bool = True  # divide advantages by the group's reward standard deviation
    format_reward: float = 0.0  # added to the reward when the completion has the answer marker
    learning_rate: float = 1e-5  # replaces train.learning_rate in GRPO stages
    steps: int = 50  # iterations per GRPO stage (train.steps, when set, wins)
    sft_warmup_steps: int = 0  # SFT steps on a GRPO stage's own rows before it (a stage <name>-warmup)

    def __post_init__(self):
        if self.loss_agg not in ("token", "sequence", "fixed"):
            raise ValueError(f"rl.loss_agg {self.loss_agg!r} is not 'token', 'sequence' or 'fixed'")
        if self.num_generations < 2:
            raise ValueError(
                f"rl.num_generations must be >= 2 for group advantages, got {self.num_generations}"
            )
        if self.temperature <= 0:
            raise ValueError(f"rl.temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        if self.sft_warmup_steps < 0:
            raise ValueError(f"rl.sft_warmup_steps must be >= 0, got {self.sft_warmup_steps}")
        if self.num_iterations < 1 or self.prompts_per_step < 1 or self.max_new_tokens < 1:
            raise ValueError("rl.num_iterations, rl.prompts_per_step and rl.max_new_tokens must be >= 1")


MODES = ("", "online", "offline", "disabled")
# W&B refuses these characters in a project or entity name, and names longer than 128 characters
_BAD_NAME = re.compile(r"[/\\#?%:]")


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    project: str
    entity: str = ""
    mode: str = ""


def _check_name(field: str, value) -> None:
    if not isinstance(value, str) or _BAD_NAME.search(value) or len(value) > 128:
        raise ValueError(
            f"config field '{field}' is {value!r}: expected a W&B name of at most 128 characters without "
            "any of / \\ # ? % :"
        )


def wandb_config(config) -> WandbConfig | None:
    """The run's wandb settings (None: off), checked; raises if ``wandb`` is asked for but not installed."""
    log = config.log
    for field in ("wandb", "wandb_entity"):
        _check_name(f"log.{field}", log[field])
    if log.wandb_mode not in MODES:
        raise ValueError(
            f"config field 'log.wandb_mode' is {log.wandb_mode!r}; expected one of "
            f"{', '.join(repr(m) for m in MODES)} ('' = wandb's default: WANDB_MODE, else online)"
        )
    if not log.wandb:
        return None
    import_wandb()
    return WandbConfig(project=log.wandb, entity=log.wandb_entity, mode=log.wandb_mode)


def import_wandb():
    try:
        return importlib.import_module("wandb")
    except ImportError as e:
        raise ModuleNotFoundError(
            f"config field 'log.wandb' asks for Weights & Biases, but the wandb package is not installed "
            f"({e}): pip install 'pbbjax[wandb]' (or pip install wandb), or leave log.wandb empty"
        ) from e


def profile_window(config) -> tuple[int, int] | None:
    """(START, COUNT) of ``profile.steps``; None when off. Raises ValueError naming the field."""
    value = config.profile.steps
    text = str(value).strip()
    if text in ("", "0"):
        return None
    try:
        start, count = (int(p) for p in text.split(","))
    except ValueError:
        start = count = None
    if start is None or start < 1 or count < 1:
        raise ValueError(
            f"config field 'profile.steps' is {value!r}: expected START,COUNT (the first global step to "
            "trace, from 1 as in metrics.jsonl, and how many steps; e.g. 10,5), or '' for no trace"
        )
    return start, count

"""The plan of a run's stages: in order, each with its trainer (SFT or GRPO), its step count, where its
global steps start, the stage it starts from, and the SFT stages' packed batches."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from pbbjax.core.distributed import same_on_every_host
from pbbjax.core.seeds import derive_seed
from pbbjax.data.curriculum import Stage
from pbbjax.data.pipeline import PipelineConfig, make_dataset, tokenize_rows
from pbbjax.eval.verdict import describe_stage


@dataclasses.dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    steps: tuple[int, ...]
    rl_stages: frozenset[str]  # the stages GRPO trains

    @property
    def offsets(self) -> list[int]:
        """The global step at which each stage starts, then the run's total."""
        return np.cumsum([0, *self.steps]).tolist()

    def is_rl(self, index: int) -> bool:
        return self.stages[index].name in self.rl_stages

    def start_of(self, index: int) -> str | None:
        """The stage whose end stage ``index`` starts from (None: the model as loaded)."""
        stage = self.stages[index]
        return stage.start_from or (self.stages[index - 1].name if index else None)

    def ends_read_back(self, kl_reference: bool) -> set[str]:
        """Stages whose end a later stage reads from disk: AD's branch points, and with a KL term
        (``kl_reference``) the starts of GRPO stages, their reference."""
        keep = {s.start_from for s in self.stages if s.start_from}
        if kl_reference:
            keep |= {self.start_of(i) for i in range(len(self.stages)) if self.is_rl(i)}
        keep.discard(None)
        return keep

    def summary(self) -> list[dict]:
        """What each stage trained on, how and for how long (``results.json``'s ``stages``)."""
        return [
            {
                "name": s.name,
                "trained_on": describe_stage(s),
                "trainer": "grpo" if self.is_rl(i) else "sft",
                "steps": steps,
                "start_from": self.start_of(i),
            }
            for i, (s, steps) in enumerate(zip(self.stages, self.steps, strict=True))
        ]


def sft_batches(stage: Stage, tokenizer, pipeline: PipelineConfig, seed: int, epochs: int, steps: int):
    """(an endless dataset of this host's packed batches, the stage's step count): ``steps`` when given,
    else ``epochs`` passes over the stage's packed global batches (the same on every host; checked)."""
    examples = tokenize_rows(stage.rows, tokenizer, pipeline.seq_len)
    cfg = dataclasses.replace(pipeline, seed=derive_seed(seed, "data", stage.name) % 2**32)
    host, hosts = jax.process_index(), jax.process_count()
    if not steps:
        passes = dataclasses.replace(cfg, num_epochs=epochs)
        steps = sum(1 for _ in make_dataset(examples, passes, host, hosts))
        same_on_every_host(steps, f"the step count of stage {stage.name!r}")
    return make_dataset(examples, dataclasses.replace(cfg, num_epochs=None), host, hosts), steps

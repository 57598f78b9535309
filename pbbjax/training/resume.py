"""Where a run resumes from: its checkpoints (the train state, and the stage, step and data position it
was saved at) and the saved ends of the stages that a later stage starts from or compares against."""

from __future__ import annotations

import json
import logging

from flax import nnx

from pbbjax.core.distributed import same_on_every_host
from pbbjax.core.storage import Workdir
from pbbjax.training import sft
from pbbjax.training.checkpoint import Checkpointer, abstract_like

log = logging.getLogger(__name__)


class RunCheckpoints:
    """``<workdir>/checkpoints/<global step>/`` every ``checkpoint_every`` steps and at each stage's end,
    and ``<workdir>/stage_ends/<stage>/`` for the stages whose end is read back."""

    def __init__(self, wd: Workdir, keep: int, fingerprint: dict):
        self.wd = wd
        self.ckpt = Checkpointer(wd.url("checkpoints"), keep=keep, fingerprint=fingerprint)

    @property
    def directory(self):
        return self.ckpt.directory

    def latest_step(self) -> int | None:
        return self.ckpt.latest_step()

    def wait(self) -> None:
        self.ckpt.wait()

    def restore(self, model: nnx.Module, optim: sft.OptimConfig, mesh):
        """(train state, meta) of the newest good checkpoint, or None when the run starts afresh."""
        if self.ckpt.latest_step() is None:
            return None
        # Every stage's state has the same structure (parameters, AdamW moments, step) and layout.
        template = sft.abstract_state(nnx.state(model), sft.make_optimizer(optim, 1), mesh)
        state, meta, step = self.ckpt.restore(template)
        log.warning("resuming from checkpoint %d: stage %s, step %d", step, meta["stage"], meta["stage_step"])
        return state, meta

    def save(self, global_step: int, state, meta: dict, *, force: bool) -> None:
        """A checkpoint of ``state`` with ``meta`` (stage, its index, the step within it, the data position:
        one for every host, which iterate the same global batches; checked)."""
        same_on_every_host(
            json.dumps(meta, sort_keys=True), "the checkpoint meta (stage, step, data position)"
        )
        self.ckpt.save(global_step, state, meta, force=force)

    def _stage_end(self, name: str) -> Checkpointer:
        return Checkpointer(
            self.wd.url("stage_ends", name), keep=1, fingerprint=self.ckpt.fingerprint, async_save=False
        )

    def save_stage_end(self, name: str, params) -> None:
        with self._stage_end(name) as c:
            c.save(0, {"params": params}, {"stage": name}, force=True)

    def load_stage_end(self, name: str, model: nnx.Module):
        """The parameters at the end of stage ``name``, laid out as ``model``'s."""
        with self._stage_end(name) as c:
            restored = c.restore({"params": abstract_like(nnx.state(model))})
        if restored is None:
            raise FileNotFoundError(f"the end of stage {name!r} is missing from {self.wd.url('stage_ends')}")
        return restored[0]["params"]

"""A ``jax.profiler`` trace of a window of training steps: the config's ``profile.steps``.

``profile.steps=START,COUNT`` ("" or "0" = off) traces the training steps whose global step numbers (the
``step`` of ``metrics.jsonl`` and TensorBoard, counted from 1 over all stages) are START ... START+COUNT-1,
into ``<workdir>/profile/`` (TensorBoard's profile plugin and Perfetto read it:
``profile/plugins/profile/<time>/<host>.xplane.pb``). A window that crosses a stage's end gives one trace
per stage (the evaluation and export between them are not traced); a resumed run traces what is left of
the window. A START beyond the run's last step is an error, before training starts; a window running past
it is cut there, with a warning.

On a pod only process 0 traces; every process runs the same steps, and tracing adds no collective.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax

log = logging.getLogger(__name__)


class StepProfiler:
    """Starts a trace before the window's first step, stops it after its last (or at a stage's end)."""

    def __init__(self, window: tuple[int, int] | None, logdir: Path, *, enabled: bool):
        self.window, self.logdir = window, Path(logdir)
        self.enabled = enabled and window is not None
        self._active = False

    def check(self, total_steps: int) -> None:
        """Raise where the window starts beyond the run's ``total_steps``; warn where it runs past them."""
        if self.window is None:
            return
        start, count = self.window
        if start > total_steps:
            raise ValueError(
                f"config field 'profile.steps' starts at step {start}, but this run has {total_steps} steps "
                f"in all; pick a START from 1 to {total_steps}"
            )
        if start + count - 1 > total_steps:
            log.warning(
                "profile.steps=%d,%d runs past the run's last step (%d): tracing steps %d-%d",
                start,
                count,
                total_steps,
                start,
                total_steps,
            )

    def _in_window(self, step: int) -> bool:
        start, count = self.window
        return start <= step < start + count

    def before(self, step: int) -> None:
        """Call before the step that becomes global ``step``."""
        if self.enabled and not self._active and self._in_window(step):
            self.logdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.logdir))
            self._active, self._first, self._last = True, step, None

    def after(self, step: int, state) -> None:
        """Call after global ``step``; ``state`` is waited for before the window's last step is traced."""
        if self._active:
            self._last = step
            if not self._in_window(step + 1):
                self.stop(state)

    def stop(self, state=None) -> None:
        """End the trace in progress, if any (at a stage's end, or when the run stops)."""
        if not self._active:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self._active = False
        last = self._last
        steps = f"from step {self._first}" if last is None else f"steps {self._first}-{last}"
        steps = f"step {last}" if last == self._first else steps
        print(f"profile: traced {steps} into {self.logdir}", flush=True)

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

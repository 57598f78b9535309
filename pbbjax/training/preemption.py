"""Stopping for preemption: every host saves at the same step, then the run exits to be relaunched.

Cloud TPU spot VMs get SIGTERM shortly before they go (and JAX's coordination service may learn of a
maintenance event first). ``PreemptionWatch`` turns SIGTERM into a flag instead of death; the trainer asks
``should_stop(step)`` after every step, and on a pod the hosts answer together (an all-gather of their flags,
plus ``multihost_utils.reached_preemption_sync_point`` where JAX offers it), so they all stop after the same
step, save it and raise ``Preempted``. Relaunching the same command resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

from pbbjax.core.distributed import all_hosts

log = logging.getLogger(__name__)

EXIT_CODE = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports


class Preempted(Exception):
    """The run saved a checkpoint and stopped because of a preemption notice; relaunch to resume."""


class PreemptionWatch:
    """SIGTERM sets a flag (in the main thread; elsewhere signals cannot be caught) until ``close``."""

    def __init__(self):
        self.requested = False
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_signal)
        self._jax_sync = jax.process_count() > 1

    def _on_signal(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after ``step``; the same answer on every host (collective on a pod)."""
        if jax.process_count() == 1:
            return self.requested
        stop = not all_hosts(not self.requested)
        if self._jax_sync:
            from jax.experimental import multihost_utils

            try:
                stop = multihost_utils.reached_preemption_sync_point(step) or stop
            except RuntimeError:  # no preemption service in this JAX setup: the same on every host
                self._jax_sync = False
        return stop

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

    def __enter__(self) -> PreemptionWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

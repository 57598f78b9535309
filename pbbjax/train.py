"""``python -m pbbjax.train --config configs/proactive.py[:preset]``: run a whole curriculum, then report.

Trains every stage of the configured curriculum, evaluating and exporting at each stage's end, and prints
the results table (also in ``<workdir>/results.json``). Restarting the same command resumes the run.
A ``gs://`` workdir is checked for credentials and write access first. With
``--config.compile_only_topology=v5p:4x4x2`` it only compiles every step for that TPU topology and reports
their memory and FLOPs (``pbbjax.training.aot``).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from pbbjax.config.run_config import build_run_config
from pbbjax.core import console
from pbbjax.training import aot
from pbbjax.training.preemption import EXIT_CODE, Preempted
from pbbjax.training.run import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/*.py file, optionally :preset", lock_config=True
)
_VERBOSE = flags.DEFINE_bool("verbose", False, console.VERBOSE_HELP)


def main(argv):
    del argv
    console.configure(_VERBOSE.value)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/proactive.py")
    config = build_run_config(config)
    if config.compile_only_topology:
        sys.exit(aot.run(config))
    try:
        train(config)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_CODE)


if __name__ == "__main__":
    app.run(main)

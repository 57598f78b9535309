"""``python -m pbbjax.evaluate --config configs/proactive.py[:preset] --checkpoint DIR``: evaluate a model.

``--checkpoint`` is either a Hugging Face directory (e.g. a run's ``export/<stage>/``) or a run's Orbax
checkpoint (its workdir, its ``checkpoints/`` dir or one ``<step>/`` dir; ``--stage`` / ``--step`` pick
one, as for ``pbbjax.export``). The config gives the curriculum, domain, seed (hence the same instructions
and held-out inputs as the run) and the evaluation settings (``--config.eval.modes=...`` etc.). It prints
the table and writes ``results.json`` (the records) and the plots to ``--out`` (default:
``<the run's workdir>/evaluations/<label>``, or ``<DIR>/evaluation`` for an HF directory).
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from pbbjax.config.run_config import build_run_config
from pbbjax.core import console
from pbbjax.core.distributed import initialize
from pbbjax.training.restore import evaluate_checkpoint

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file, optionally :preset")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "an HF model directory or a run's Orbax checkpoint")
_STAGE = flags.DEFINE_string("stage", None, "Orbax: the newest checkpoint of this stage")
_STEP = flags.DEFINE_integer("step", None, "Orbax: the checkpoint of this global step")
_OUT = flags.DEFINE_string("out", None, "where results.json and plots/ go")
_VERBOSE = flags.DEFINE_bool("verbose", False, console.VERBOSE_HELP)


def main(argv):
    del argv
    console.configure(_VERBOSE.value)
    config = _CONFIG.value
    if config is None or not _CHECKPOINT.value:
        raise app.UsageError("--config and --checkpoint are required")
    config = build_run_config(config)
    initialize(config.distributed, config.cluster)

    checkpoint = Path(_CHECKPOINT.value)
    if not checkpoint.is_dir():
        raise app.UsageError(f"--checkpoint {checkpoint} is not a directory")
    evaluate_checkpoint(
        config, checkpoint, _STAGE.value, _STEP.value, Path(_OUT.value) if _OUT.value else None
    )


if __name__ == "__main__":
    app.run(main)

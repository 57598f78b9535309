"""``python -m pbbjax.data --config configs/proactive.py --out DIR``: dump every stage and evaluation set.

For each stage and each evaluation set it writes ``DIR/<name>.jsonl`` and ``DIR/<name>/`` (a ``datasets``
``save_to_disk`` directory), plus ``DIR/instructions.jsonl`` and ``DIR/summary.json``, and prints a table of
rows and tokens (tokenized with the configured model's tokenizer and chat template) per set.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from pbbjax.config.run_config import build_config_curriculum, build_run_config
from pbbjax.core import console
from pbbjax.data.dump import dump, format_table
from pbbjax.models.default_model import default_model_path
from pbbjax.models.hf_io import load_tokenizer, resolve_model_dir

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/*.py file, optionally :preset", lock_config=True
)
_OUT = flags.DEFINE_string("out", None, "output directory (replaced whole)")
_VERBOSE = flags.DEFINE_bool("verbose", False, console.VERBOSE_HELP)


def build(config):
    """The curriculum the config describes."""
    return build_config_curriculum(build_run_config(config))[1]


def main(argv):
    del argv
    console.configure(_VERBOSE.value)

    config = _CONFIG.value
    if config is None or _OUT.value is None:
        raise app.UsageError("usage: python -m pbbjax.data --config configs/<curriculum>.py --out DIR")
    curriculum = build(config)
    tokenizer = load_tokenizer(resolve_model_dir(config.model.path or default_model_path()))
    summary = dump(curriculum, Path(_OUT.value), tokenizer)
    print(f"{config.curriculum} curriculum, domain {config.domain}, seed {config.seed} -> {_OUT.value}")
    print(format_table(summary))


if __name__ == "__main__":
    app.run(main)

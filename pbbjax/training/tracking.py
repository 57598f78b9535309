"""Weights & Biases tracking of a run: the config's ``log`` section, checked, and the wandb run itself.

Config fields: ``log.wandb`` (the W&B project; "" = off), ``log.wandb_entity`` (the team or user; "" =
wandb's default) and ``log.wandb_mode`` ("" = wandb's own choice, i.e. ``WANDB_MODE`` or online;
"online", "offline", "disabled"). ``wandb`` is an optional dependency (``pip install 'pbbjax[wandb]'``):
``config.sections.wandb_config`` checks the fields and that the package imports, before a run starts.

:func:`start_wandb` starts (or resumes) the run of a workdir on the primary process: its name is the
workdir's name, its config the whole run config, and its id is kept in ``<workdir>/wandb_run_id``, so
that running the same command again resumes the same wandb run. ``MetricsLogger`` sends it every metric
that TensorBoard gets.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from pbbjax.config.sections import WandbConfig, import_wandb

RUN_ID_FILE = "wandb_run_id"


def run_id(workdir: Path) -> str:
    """The wandb run id of ``workdir``: the one it stores, else a new one, stored."""
    path = Path(workdir) / RUN_ID_FILE
    if path.is_file() and (stored := path.read_text().strip()):
        return stored
    new = secrets.token_hex(4)  # 8 characters of [0-9a-f], as wandb's own ids
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new + "\n")
    return new


def start_wandb(workdir: Path, settings: WandbConfig, run_config: dict, name: str):
    """The wandb run of ``workdir`` (its stored id resumed, else a new one), its files in <workdir>/wandb."""
    wandb = import_wandb()
    return wandb.init(
        project=settings.project,
        entity=settings.entity or None,
        mode=settings.mode or None,
        name=name,
        id=run_id(workdir),
        resume="allow",
        config=run_config,
        dir=str(workdir),
    )

"""Weights & Biases tracking of a run: the config's ``log`` section, checked, and the wandb run itself.

Config fields: ``log.wandb`` (the W&B project; "" = off), ``log.wandb_entity`` (the team or user; "" =
wandb's default) and ``log.wandb_mode`` ("" = wandb's own choice, i.e. ``WANDB_MODE`` or online;
"online", "offline", "disabled"). ``wandb`` is an optional dependency (``pip install 'pbbjax[wandb]'``):
:func:`wandb_config` checks the fields and that the package imports, before a run starts.

:func:`start_wandb` starts (or resumes) the run of a workdir on the primary process: its name is the
workdir's name, its config the whole run config, and its id is kept in ``<workdir>/wandb_run_id``, so
that running the same command again resumes the same wandb run. ``MetricsLogger`` sends it every metric
that TensorBoard gets.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import secrets
from pathlib import Path

RUN_ID_FILE = "wandb_run_id"
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

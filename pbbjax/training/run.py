"""One configured run from start to results: checks before any compute, the model, then the runner."""

from __future__ import annotations

import dataclasses

from pbbjax.config.run_config import RunConfig
from pbbjax.core.distributed import initialize
from pbbjax.core.storage import Workdir, check_workdir
from pbbjax.models.default_model import default_model_path
from pbbjax.models.tiny import tiny_model_dir
from pbbjax.training.runner import Runner


def train(config: RunConfig) -> list[dict]:
    """Train ``config``'s whole curriculum (resuming from its workdir) and return its evaluation records."""
    check_workdir(config.workdir)
    initialize(config.distributed, config.cluster)
    if not config.workdir:
        workdir = f"runs/{config.curriculum}-{config.domain}-seed{config.seed}"
        source = config.source.copy_and_resolve_references()
        with source.unlocked():
            source.workdir = workdir
        config = dataclasses.replace(config, workdir=workdir, source=source)
    local = Workdir(config.workdir).local  # a gs:// workdir's local mirror
    local.mkdir(parents=True, exist_ok=True)
    if config.model.tiny:
        path = tiny_model_dir(config.model.tiny, local, config.seed)
    else:
        path = config.model.path or default_model_path()
    return Runner(config, path).run()

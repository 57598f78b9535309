"""One configured run from start to results: checks before any compute, the model, then the runner."""

from __future__ import annotations

from pbbjax.config.schema import lora_config
from pbbjax.core.distributed import initialize
from pbbjax.core.storage import Workdir, check_workdir
from pbbjax.models.default_model import default_model_path
from pbbjax.models.tiny import tiny_model_dir
from pbbjax.training.profiling import profile_window
from pbbjax.training.runner import Runner
from pbbjax.training.tracking import wandb_config


def train(config) -> list[dict]:
    """Train ``config``'s whole curriculum (resuming from its workdir) and return its evaluation records."""
    wandb_config(config)  # bad values, or wandb asked for but missing: an error before any work
    profile_window(config)
    check_workdir(config.workdir)
    lora_config(config)  # a bad model.lora field fails here, before any compute
    initialize(config.distributed, config.cluster.to_dict())
    with config.unlocked():
        config.workdir = config.workdir or f"runs/{config.curriculum}-{config.domain}-seed{config.seed}"
    workdir = Workdir(config.workdir).local  # a gs:// workdir's local mirror
    workdir.mkdir(parents=True, exist_ok=True)
    if config.model.tiny:
        path = tiny_model_dir(config.model.tiny.to_dict(), workdir, config.seed)
    else:
        path = config.model.path or default_model_path()
    return Runner(config, path).run()

"""``python -m pbbjax.train --config configs/proactive.py[:preset]``: run a whole curriculum, then report.

Trains every stage of the configured curriculum, evaluating and exporting at each stage's end, and prints
the results table (also in ``<workdir>/results.json``). Restarting the same command resumes the run.
A ``gs://`` workdir is checked for credentials and write access first. With
``--config.compile_only_topology=v5p:4x4x2`` it only compiles every step for that TPU topology and reports
their memory and FLOPs (``pbbjax.aot``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from pbbjax import console

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "a configs/*.py file, optionally :preset", lock_config=True
)
_VERBOSE = flags.DEFINE_bool("verbose", False, console.VERBOSE_HELP)


def tiny_model_dir(fields: dict, workdir: Path, seed: int) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, written once as an HF directory in the workdir.

    On a pod, process 0 writes it first; a host that does not share its disk then writes its own copy
    (the same bytes: the weights come from ``seed``)."""
    import jax

    out = workdir / "tiny_model"
    if jax.process_index() == 0:
        _write_tiny_model(fields, out, seed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pbbjax-tiny-model")
        _write_tiny_model(fields, out, seed)
    return out


def _write_tiny_model(fields: dict, out: Path, seed: int) -> None:
    if (out / "config.json").exists():
        return
    from flax import nnx

    import pbbjax
    from pbbjax.models.config import ModelConfig
    from pbbjax.models.decoder import Transformer
    from pbbjax.models.hf_io import load_tokenizer

    tokenizer = load_tokenizer(pbbjax.default_model_path())
    hf = {
        **fields,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    cfg = ModelConfig.from_hf(hf, generation_config=generation)
    pbbjax.save_model(Transformer(cfg, rngs=nnx.Rngs(seed)), out, tokenizer=tokenizer, write=True)


def run(config) -> list[dict]:
    """Train ``config``'s whole curriculum (resuming from its workdir) and return its evaluation records."""
    from pbbjax.config import lora_config
    from pbbjax.distributed import initialize
    from pbbjax.storage import Workdir, check_workdir
    from pbbjax.training.profiling import profile_window
    from pbbjax.training.tracking import wandb_config

    wandb_config(config)  # bad values, or wandb asked for but missing: an error before any work
    profile_window(config)
    check_workdir(config.workdir)
    lora_config(config)  # a bad model.lora field fails here, before any compute
    initialize(config.distributed, config.cluster.to_dict())
    import pbbjax
    from pbbjax.training.runner import Runner

    with config.unlocked():
        config.workdir = config.workdir or f"runs/{config.curriculum}-{config.domain}-seed{config.seed}"
    workdir = Workdir(config.workdir).local  # a gs:// workdir's local mirror
    workdir.mkdir(parents=True, exist_ok=True)
    if config.model.tiny:
        path = tiny_model_dir(config.model.tiny.to_dict(), workdir, config.seed)
    else:
        path = config.model.path or pbbjax.default_model_path()
    return Runner(config, path).run()


def main(argv):
    del argv
    console.configure(_VERBOSE.value)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/proactive.py")
    if config.compile_only_topology:
        from pbbjax import aot

        sys.exit(aot.run(config))
    from pbbjax.training.preemption import EXIT_CODE, Preempted

    try:
        run(config)
    except Preempted as e:
        print(e, file=sys.stderr)
        sys.exit(EXIT_CODE)


if __name__ == "__main__":
    app.run(main)

"""A model to evaluate, from a Hugging Face directory or a run's Orbax checkpoint (``pbbjax.evaluate``'s
``--checkpoint``): the run's config.json with the checkpoint's parameters restored straight into their
shards, and the LoRA adapters its fingerprint names."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pbbjax.config.schema import param_dtype
from pbbjax.core.storage import orbax_path
from pbbjax.models.architecture import ModelConfig
from pbbjax.models.default_model import default_model_path
from pbbjax.models.hf_io import abstract_model, load_model, load_tokenizer
from pbbjax.models.sharding import make_mesh
from pbbjax.training.export import checkpoint_lora, find_checkpoints, read_info, select_checkpoint


def model_from_checkpoint(source: Path, step_dir: Path, config, mesh):
    """The model of ``source``'s config.json with the parameters saved in an Orbax checkpoint step
    directory, each restored straight into its shard (no base weights are read); with the LoRA adapters
    the checkpoint's fingerprint names."""
    cfg = ModelConfig.from_dir(
        source,
        param_dtype=param_dtype(config),
        compute_dtype=config.model.compute_dtype or config.model.dtype,
        lora=checkpoint_lora(read_info(step_dir)),
        generation_config=json.loads(p.read_text())
        if (p := source / "generation_config.json").is_file()
        else {},
    )
    graphdef, state = abstract_model(cfg, mesh)
    item = {"params": state}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        params = ckptr.restore(orbax_path(step_dir) / "state", args=args)["params"]
    return nnx.merge(graphdef, params)


def load_for_eval(config, checkpoint: Path, stage=None, step=None):
    """(model with the checkpoint's parameters, tokenizer, label, default output directory)."""
    mesh = make_mesh(**config.mesh)
    if (checkpoint / "config.json").is_file():  # a Hugging Face directory
        options = dict(dtype=config.model.dtype, mesh=mesh, compute_dtype=config.model.compute_dtype or None)
        model, tokenizer = load_model(checkpoint, **options)
        return model, tokenizer, checkpoint.name, checkpoint / "evaluation"
    found, workdir = find_checkpoints(checkpoint)
    chosen = select_checkpoint(found, checkpoint, stage, step)
    source = workdir / "source_model"  # the run's config.json and tokenizer (pbbjax.export writes it)
    if not (source / "config.json").is_file():
        source = workdir / "tiny_model" if config.model.tiny else Path(config.model.path or _default())
    model = model_from_checkpoint(source, chosen.path, config, mesh)
    label = f"{chosen.stage}-step{chosen.step}" if chosen.step is not None else f"{chosen.stage}-end"
    if jax.process_index() == 0:
        print(f"evaluating {chosen}")
    return model, load_tokenizer(source), label, workdir / "evaluations" / label


def _default() -> str:
    return str(default_model_path())

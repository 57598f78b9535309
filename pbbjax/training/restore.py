"""Evaluating a saved model (``python -m pbbjax.evaluate``): from a Hugging Face directory or a run's Orbax
checkpoint, whose parameters are restored straight into their shards onto the run's config.json, with the
LoRA adapters its fingerprint names."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from pbbjax.config.run_config import RunConfig, build_config_curriculum
from pbbjax.core.storage import orbax_path
from pbbjax.eval.harness import EvalJob, evaluate, results_table
from pbbjax.eval.plots import write_plots
from pbbjax.models.architecture import ModelConfig
from pbbjax.models.default_model import default_model_path
from pbbjax.models.hf_io import abstract_model, load_model, load_tokenizer
from pbbjax.models.sharding import make_mesh
from pbbjax.training import sft
from pbbjax.training.export import checkpoint_lora, find_checkpoints, read_info, select_checkpoint


def model_from_checkpoint(source: Path, step_dir: Path, config: RunConfig, mesh):
    """The model of ``source``'s config.json with the parameters saved in an Orbax checkpoint step
    directory, each restored straight into its shard (no base weights are read); with the LoRA adapters
    the checkpoint's fingerprint names."""
    cfg = ModelConfig.from_dir(
        source,
        param_dtype=config.model.param_dtype,
        **config.model.options(lora=checkpoint_lora(read_info(step_dir))),
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


def load_for_eval(config: RunConfig, checkpoint: Path, stage=None, step=None):
    """(model with the checkpoint's parameters, tokenizer, label, default output directory)."""
    mesh = make_mesh(**config.mesh)
    if (checkpoint / "config.json").is_file():  # a Hugging Face directory
        # an exported directory: LoRA adapters, if the run had any, are merged into its weights
        options = config.model.options(lora=None)
        model, tokenizer = load_model(checkpoint, dtype=config.model.dtype, mesh=mesh, **options)
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


def evaluate_checkpoint(
    config: RunConfig, checkpoint: Path, stage=None, step=None, out: Path | None = None
) -> list[dict]:
    """Evaluate the model of ``checkpoint`` (an HF directory or a run's Orbax checkpoint; ``stage`` /
    ``step`` pick one) on ``config``'s curriculum and return the records; process 0 prints the table and
    writes ``results.json`` and the plots to ``out`` (default: ``<workdir>/evaluations/<label>``, or
    ``<DIR>/evaluation``)."""
    model, tokenizer, label, default_out = load_for_eval(config, checkpoint, stage, step)
    out = out or default_out
    domain, curriculum = build_config_curriculum(config)
    graphdef, params = nnx.split(model)
    sharding = sft.batch_sharding(model.mesh)

    def put(batch):
        return jax.make_array_from_process_local_data(sharding, batch)

    job = EvalJob(
        tokenizer,
        domain,
        curriculum,
        config.eval,
        eval_step=sft.make_eval_step(graphdef, config.train.optim.loss_mode),
        seq_len=config.pipeline.seq_len,
        put=put,
        cot=config.data.cot,
    )
    records = evaluate(model, params, job)
    records = [{"after": label, "step": 0, "final": True, **r} for r in records]
    if jax.process_index() != 0:  # every host evaluated (collectives); process 0 writes and reports
        return records
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "curriculum": config.curriculum,
        "domain": config.domain,
        "seed": config.seed,
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{config.curriculum} curriculum, {config.domain}, seed {config.seed}: {checkpoint}")
    print(results_table(records))
    for path in write_plots(records, out / "plots", title=f"{config.curriculum}, {config.domain}: {label}"):
        print(f"plot: {path}")
    print(f"results: {out / 'results.json'}")
    return records

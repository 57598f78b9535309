"""``python -m pbbjax.evaluate --config configs/proactive.py[:preset] --checkpoint DIR``: evaluate a model.

``--checkpoint`` is either a Hugging Face directory (e.g. a run's ``export/<stage>/``) or a run's Orbax
checkpoint (its workdir, its ``checkpoints/`` dir or one ``<step>/`` dir; ``--stage`` / ``--step`` pick
one, as for ``pbbjax.export``). The config gives the curriculum, domain, seed (hence the same instructions
and held-out inputs as the run) and the evaluation settings (``--config.eval.modes=...`` etc.). It prints
the table and writes ``results.json`` (the records) and the plots to ``--out`` (default:
``<the run's workdir>/evaluations/<label>``, or ``<DIR>/evaluation`` for an HF directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from pbbjax.config.schema import build_config_curriculum, eval_config, pipeline_config
from pbbjax.core import console
from pbbjax.core.distributed import initialize
from pbbjax.eval.harness import evaluate, results_table
from pbbjax.eval.plots import write_plots
from pbbjax.training import sft
from pbbjax.training.restore import load_for_eval

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
    initialize(config.distributed, config.cluster.to_dict())

    checkpoint = Path(_CHECKPOINT.value)
    if not checkpoint.is_dir():
        raise app.UsageError(f"--checkpoint {checkpoint} is not a directory")
    model, tokenizer, label, out = load_for_eval(config, checkpoint, _STAGE.value, _STEP.value)
    out = Path(_OUT.value) if _OUT.value else out
    domain, curriculum = build_config_curriculum(config)
    graphdef, params = nnx.split(model)
    sharding = sft.batch_sharding(model.mesh)

    def put(batch):
        return jax.make_array_from_process_local_data(sharding, batch)

    records = evaluate(
        model,
        params,
        tokenizer,
        domain,
        curriculum,
        eval_config(config),
        eval_step=sft.make_eval_step(graphdef, config.train.loss_mode),
        seq_len=pipeline_config(config).seq_len,
        put=put,
        cot=config.data.cot,
    )
    records = [{"after": label, "step": 0, "final": True, **r} for r in records]
    if jax.process_index() != 0:  # every host evaluated (collectives); process 0 writes and reports
        return
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


if __name__ == "__main__":
    app.run(main)

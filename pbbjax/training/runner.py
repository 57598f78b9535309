"""The curriculum runner: every stage of a curriculum in order, with checkpoints, evaluation and export.

For each stage: tokenize its rows, count its steps (``train.epochs`` passes over the stage's packed
batches, or ``train.steps``), build its optimizer and schedule (fresh state by default), start from the
previous stage's parameters (or from the end of ``stage.start_from``, e.g. AD branches), then train,
checkpointing every ``train.checkpoint_every`` steps and at the stage's end, and evaluate at the end (and
every ``train.eval_every`` steps). Stage-end results go to ``<workdir>/results.json``; the model to
``<workdir>/export/<stage>/`` in HF format.

Restarting the same command in the same workdir resumes from the newest checkpoint: the stage, the step
within it, the parameters, the optimizer and the data iterator, so the run ends with the same parameters
as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from pbbjax.config import curriculum_config, domain_of, pipeline_config
from pbbjax.curriculum import build_curriculum, derive_seed
from pbbjax.evaluation import EvalConfig, evaluate
from pbbjax.models.hf_io import load_model, save_model
from pbbjax.models.sharding import make_mesh
from pbbjax.pipeline import make_dataset, tokenize_rows
from pbbjax.training import sft
from pbbjax.training.checkpoint import Checkpointer, abstract_like, shape_digest
from pbbjax.training.metrics import MetricsLogger, Progress, format_table, mfu, train_flops_per_token

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN or infinite loss or gradient."""


def optim_config(config) -> sft.OptimConfig:
    fields = {f.name for f in dataclasses.fields(sft.OptimConfig)}
    return sft.OptimConfig(**{k: v for k, v in config.train.to_dict().items() if k in fields})


def eval_config(config) -> EvalConfig:
    d = {k: v for k, v in config.eval.to_dict().items() if k != "at_start"}
    return EvalConfig(**{**d, "sets": tuple(d["sets"])})


class Runner:
    def __init__(self, config, model_path):
        self.config = config
        self.workdir = Path(config.workdir)
        self.primary = jax.process_index() == 0
        self.mesh = make_mesh(**config.mesh)
        self.model, self.tokenizer = load_model(
            model_path,
            dtype=config.model.dtype,
            mesh=self.mesh,
            compute_dtype=config.model.compute_dtype or None,
            scan_layers=config.model.scan_layers,
            remat=config.model.remat,
        )
        self.graphdef, _ = nnx.split(self.model)
        self.domain = domain_of(config)
        self.curriculum = build_curriculum(self.domain, config.curriculum, curriculum_config(config))
        self.pipeline = pipeline_config(config)
        self.optim = optim_config(config)
        sft.check_batch(self.pipeline.batch_size, self.optim, self.mesh)
        self.eval_cfg = eval_config(config)
        self.eval_step = sft.make_eval_step(self.graphdef, self.optim.loss_mode)
        self.batch_sharding = sft.batch_sharding(self.mesh)
        self.logger = MetricsLogger(self.workdir)
        fingerprint = {**_model_fingerprint(self.model.cfg), "params": shape_digest(nnx.state(self.model))}
        self.ckpt = Checkpointer(
            self.workdir / "checkpoints", keep=config.train.keep_checkpoints, fingerprint=fingerprint
        )
        self.flops_per_token = train_flops_per_token(self.model.cfg, self.pipeline.seq_len)
        self.results_path = self.workdir / "results.json"

    # -- data -------------------------------------------------------------------------------------------
    def stage_data(self, stage):
        examples = tokenize_rows(stage.rows, self.tokenizer, self.pipeline.seq_len)
        cfg = dataclasses.replace(
            self.pipeline, seed=derive_seed(self.config.seed, "data", stage.name) % 2**32
        )
        steps = self.config.train.steps
        if not steps:
            local = sum(
                1
                for _ in make_dataset(
                    examples,
                    dataclasses.replace(cfg, num_epochs=self.config.train.epochs),
                    jax.process_index(),
                    jax.process_count(),
                )
            )
            steps = _min_over_hosts(local)
        infinite = dataclasses.replace(cfg, num_epochs=None)
        return make_dataset(examples, infinite, jax.process_index(), jax.process_count()), steps

    def put(self, batch):
        """This host's slice of the batch -> the global batch array on the mesh."""
        return jax.make_array_from_process_local_data(self.batch_sharding, batch)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict:
        stages = self.curriculum.stages
        data = [self.stage_data(s) for s in stages]
        offsets = np.cumsum([0] + [steps for _, steps in data]).tolist()
        results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        params = nnx.state(self.model)
        resume = self._restore()  # (state, meta) of the newest checkpoint, or None
        if self.config.eval.at_start and "start" not in results:
            results["start"] = self._evaluate(params)
            self._write_results(results)
        branched = {s.start_from for s in stages if s.start_from}
        for si, (stage, (dataset, steps)) in enumerate(zip(stages, data, strict=True)):
            if resume is not None and resume[1]["stage_index"] > si:
                continue  # finished before the restart; a branch loads its end from disk
            if stage.start_from:
                params = self._load_stage_end(stage.start_from)  # from disk: the live arrays were donated
            optimizer = sft.make_optimizer(self.optim, steps)
            it, start = iter(dataset), 0
            if resume is not None:  # the stage the run was in: parameters, optimizer and data position
                (state, meta), resume = resume, None
                start = meta["stage_step"]
                it.set_state(meta["data_state"])
            else:
                state = sft.init_state(nnx.merge(self.graphdef, params), optimizer, self.mesh)
            state = self._train_stage(si, stage, state, it, start, steps, optimizer, offsets[si])
            params = state["params"]
            if stage.name in branched:
                self._save_stage_end(stage.name, params)
            if stage.name not in results:
                results[stage.name] = self._evaluate(params)
                self._write_results(results)
            self._export(stage.name, params)
        self.ckpt.wait()
        self._print_results(results)
        if jax.process_count() > 1:  # no host leaves while another still writes
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pbbjax-run-end")
        return results

    def _restore(self):
        if self.ckpt.latest_step() is None:
            return None
        # Every stage's state has the same structure (parameters, AdamW moments, step).
        template = sft.init_state(self.model, sft.make_optimizer(self.optim, 1), self.mesh)
        state, meta, step = self.ckpt.restore(abstract_like(template))
        log.warning("resuming from checkpoint %d: stage %s, step %d", step, meta["stage"], meta["stage_step"])
        return state, meta

    def _train_stage(self, si, stage, state, it, start, steps, optimizer, offset):
        train_step = sft.make_train_step(
            self.graphdef, optimizer, self.optim, steps, sft.state_shardings(state), self.mesh
        )
        progress = Progress(stage.name, steps, initial=start)
        every = self.config.train.checkpoint_every
        t0, tokens = time.perf_counter(), 0
        for step in range(start, steps):
            batch = next(it)
            state, m = train_step(state, self.put(batch))
            m = jax.device_get(m)
            if not m["finite"]:
                last = self.ckpt.latest_step()
                raise NonFiniteLossError(
                    f"stage {stage.name!r} step {step + 1}: loss {m['loss']} or gradient norm "
                    f"{m['grad_norm']} is not finite; stopped. The last good checkpoint ({last}) in "
                    f"{self.ckpt.directory} is kept."
                )
            tokens += int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()
            elapsed = time.perf_counter() - t0
            tps = tokens / elapsed
            metrics = {k: float(m[k]) for k in ("loss", "grad_norm", "learning_rate")}
            metrics |= {"tokens_per_s": tps, "stage_step": step + 1}
            peak = self.config.train.peak_flops or None
            if (value := mfu(tps, self.flops_per_token, peak, num_chips=jax.device_count())) is not None:
                metrics["mfu"] = value
            self.logger.log(offset + step + 1, metrics, prefix=f"{stage.name}/")
            progress.update(step + 1, loss=metrics["loss"], tokens_per_s=tps, lr=metrics["learning_rate"])
            if (step + 1) % every == 0 or step + 1 == steps:
                meta = {
                    "stage": stage.name,
                    "stage_index": si,
                    "stage_step": step + 1,
                    "data_state": it.get_state(),
                }
                self.ckpt.save(offset + step + 1, state, meta, force=step + 1 == steps)
            if (
                self.config.train.eval_every
                and (step + 1) % self.config.train.eval_every == 0
                and step + 1 < steps
            ):
                self.logger.log(
                    offset + step + 1, _flatten(self._evaluate(state["params"])), prefix=f"{stage.name}/eval/"
                )
        progress.close()
        return state

    # -- evaluation, export, results --------------------------------------------------------------------
    def _evaluate(self, params) -> dict:
        model = nnx.merge(self.graphdef, params)
        return evaluate(
            model,
            params,
            self.tokenizer,
            self.domain,
            self.curriculum,
            self.eval_cfg,
            eval_step=self.eval_step,
            seq_len=self.pipeline.seq_len,
            put=self.put,
        )

    def _export(self, name, params):
        if self.config.train.export and (
            self.config.train.export == "always" or self.model.cfg.num_params < 1e9
        ):
            save_model(
                nnx.merge(self.graphdef, params), self.workdir / "export" / name, tokenizer=self.tokenizer
            )

    def _stage_end_checkpointer(self, name):
        return Checkpointer(
            self.workdir / "stage_ends" / name, keep=1, fingerprint=self.ckpt.fingerprint, async_save=False
        )

    def _save_stage_end(self, name, params):
        with self._stage_end_checkpointer(name) as c:
            c.save(0, {"params": params}, {"stage": name}, force=True)

    def _load_stage_end(self, name):
        with self._stage_end_checkpointer(name) as c:
            restored = c.restore({"params": abstract_like(nnx.state(self.model))})
        if restored is None:
            raise FileNotFoundError(
                f"the end of stage {name!r} is missing from {self.workdir / 'stage_ends'}"
            )
        return restored[0]["params"]

    def _write_results(self, results):
        if self.primary:
            tmp = self.results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            tmp.replace(self.results_path)

    def _print_results(self, results):
        if not self.primary:
            return
        rows = [
            {"after": stage, "set": name, **entry}
            for stage, sets in results.items()
            for name, entry in sets.items()
        ]
        c = self.config
        print(f"\n{c.curriculum} curriculum, {c.domain}, seed {c.seed}: {self.workdir}")
        print(format_table(rows, ["after", "set", "n", "loss", "accuracy"]))


def _model_fingerprint(cfg) -> dict:
    fields = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "tie_word_embeddings",
        "param_dtype",
    )
    return {f: getattr(cfg, f) for f in fields}


def _flatten(results: dict) -> dict:
    return {f"{s}/{k}": v for s, entry in results.items() for k, v in entry.items() if isinstance(v, float)}


def _min_over_hosts(n: int) -> int:
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray(n))))

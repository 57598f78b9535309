"""The curriculum runner: every stage of a curriculum in order, with checkpoints, evaluation and export.

For each stage: tokenize its rows, count its steps (``train.epochs`` passes over the stage's packed
batches, or ``train.steps``), build its optimizer and schedule (fresh state by default), start from the
previous stage's parameters (or from the end of ``stage.start_from``, e.g. AD branches), then train,
checkpointing every ``train.checkpoint_every`` steps and at the stage's end, and evaluate at the end (and
every ``train.eval_every`` steps). Stages named in ``rl.stages`` are trained by GRPO on their rows' prompts
(``rollout.py``) instead of SFT on their rows. Evaluation records (``eval/harness.py``) go to
``<workdir>/results.json`` (``results.py``), plots to ``<workdir>/plots/``, the model to
``<workdir>/export/<stage>/`` in HF format. The parts: the plan of stages (``stages.py``), resuming
(``resume.py``), the results store and report (``results.py``). ``log.wandb`` also sends the metrics to
Weights & Biases (``tracking.py``); ``profile.steps`` traces a window of steps with ``jax.profiler``
(``profiling.py``).

Restarting the same command in the same workdir resumes from the newest checkpoint: the stage, the step
within it, the parameters, the optimizer and the data iterator, so the run ends with the same parameters
as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pbbjax.config.run_config import RunConfig, build_config_curriculum
from pbbjax.core.seeds import derive_seed
from pbbjax.core.storage import Workdir
from pbbjax.data.formatting import chat_prompt
from pbbjax.eval.harness import EvalJob, evaluate
from pbbjax.inference.sampler import generation_ids
from pbbjax.models.hf_io import load_model, save_model
from pbbjax.models.lora_io import save_adapter
from pbbjax.models.sharding import make_mesh
from pbbjax.training import sft
from pbbjax.training.checkpoint import shape_digest
from pbbjax.training.export import write_source_model
from pbbjax.training.metrics import MetricsLogger, Progress, mfu, train_flops_per_token
from pbbjax.training.preemption import Preempted, PreemptionWatch
from pbbjax.training.profiling import StepProfiler
from pbbjax.training.results import ResultsStore, base_model, report
from pbbjax.training.resume import RunCheckpoints
from pbbjax.training.rollout import GRPOStepper, grpo_optimizer, text_reward_fn
from pbbjax.training.stages import StagePlan, sft_batches
from pbbjax.training.tracking import RUN_ID_FILE

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
    def __init__(self, config: RunConfig, model_path):
        self.config = config
        self.wd = Workdir(config.workdir)  # gs://: checkpoints there, the small files in a local mirror
        self.wd.pull("results.json", "metrics.jsonl", RUN_ID_FILE)
        self.workdir = self.wd.local
        self.primary = jax.process_index() == 0
        self.mesh = make_mesh(**config.mesh)
        self.model, self.tokenizer = load_model(
            model_path, dtype=config.model.param_dtype, mesh=self.mesh, **config.model.options()
        )
        if config.model.remat != "none" and not config.model.scan_layers and jax.default_backend() == "cpu":
            log.warning(
                "model.remat=%s without model.scan_layers saves almost no memory on XLA:CPU; set "
                "model.scan_layers=True as well, or use train.microbatches (scripts/train_memory.py "
                "measures each choice)",
                config.model.remat,
            )
        self.graphdef, _ = nnx.split(self.model)
        write_source_model(self.workdir, self.model.cfg, self.tokenizer)
        self._push("source_model")
        self.domain, self.curriculum = build_config_curriculum(config)
        names = [s.name for s in self.curriculum.stages]
        if config.train.stop_after and config.train.stop_after not in names:
            raise ValueError(
                f"config field 'train.stop_after' is {config.train.stop_after!r}; expected '' or a stage of "
                f"the {config.curriculum} curriculum: {', '.join(names)}"
            )
        self.pipeline = config.pipeline
        self.optim = config.train.optim
        sft.check_batch(self.pipeline.batch_size, self.optim, self.mesh)
        self.eval_cfg = config.eval
        if missing := [name for name in self.eval_cfg.sets if name not in self.curriculum.eval_sets]:
            why = " (with data.stage1_domain, no 'train' set)" if config.data.stage1_domain else ""
            raise ValueError(  # before any training, not at the first evaluation
                f"eval.sets names {missing}; this curriculum's evaluation sets are "
                f"{sorted(self.curriculum.eval_sets)}{why}"
            )
        self.rl = config.rl
        self.rl_stages = set(config.rl_stages)
        unknown = self.rl_stages - {s.name for s in self.curriculum.stages}
        if unknown:
            raise ValueError(
                f"rl.stages names {sorted(unknown)}; the {config.curriculum} curriculum's stages are "
                f"{[s.name for s in self.curriculum.stages]}"
            )
        self.batch_sharding = sft.batch_sharding(self.mesh)
        self.eval_job = EvalJob(
            self.tokenizer,
            self.domain,
            self.curriculum,
            self.eval_cfg,
            eval_step=sft.make_eval_step(self.graphdef, self.optim.loss_mode),
            seq_len=self.pipeline.seq_len,
            put=self.put,
            cot=config.data.cot,
        )
        name = self.wd.location.rstrip("/").rsplit("/", 1)[-1]
        self.logger = MetricsLogger(
            self.workdir, wandb=config.wandb, run_config=config.source.to_dict(), name=name
        )
        self._push(RUN_ID_FILE)
        self.profiler = StepProfiler(config.profile, self.workdir / "profile", enabled=self.primary)
        fingerprint = {**_model_fingerprint(self.model.cfg), "params": shape_digest(nnx.state(self.model))}
        self.ckpt = RunCheckpoints(self.wd, config.train.keep_checkpoints, fingerprint)
        self.flops_per_token = train_flops_per_token(self.model.cfg, self.pipeline.seq_len)
        header = {"curriculum": config.curriculum, "domain": config.domain, "seed": config.seed}
        header["base_model"] = base_model(config)
        self.results = ResultsStore(
            self.workdir / "results.json", header, primary=self.primary, push=self._push
        )

    # -- data -------------------------------------------------------------------------------------------
    def stage_data(self, stage):
        """(packed-batch dataset, steps) of an SFT stage; (None, steps) of a GRPO stage. A GRPO stage's SFT
        warm-up takes ``rl.sft_warmup_steps``."""
        steps = self.config.train.steps
        if stage.name in self.rl_stages:
            return None, steps or self.rl.steps
        if stage.warmup_for is not None:
            steps = self.rl.sft_warmup_steps
        c = self.config
        return sft_batches(stage, self.tokenizer, self.pipeline, c.seed, c.train.epochs, steps)

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
        self.plan = StagePlan(tuple(stages), tuple(steps for _, steps in data), frozenset(self.rl_stages))
        offsets = self.plan.offsets
        self.profiler.check(offsets[-1])
        self.results.stages = self.plan.summary()
        params = nnx.state(self.model)
        resume = self.ckpt.restore(self.model, self.optim, self.mesh)  # (state, meta) of the newest, or None
        if self.config.eval_at_start and not self.results.evaluated("start"):
            self._evaluate(params, "start", 0)
        keep_end = self.plan.ends_read_back(kl_reference=bool(self.rl.beta))
        if stop := self.config.train.stop_after:  # every end up to it: whatever a run going on from it reads
            names = [s.name for s in stages]
            keep_end |= set(names[: names.index(stop) + 1])
        for si, (stage, (dataset, steps)) in enumerate(zip(stages, data, strict=True)):
            if resume is not None and resume[1]["stage_index"] > si:
                continue  # finished before the restart; a branch loads its end from disk
            if stage.start_from:  # from disk: the live arrays were donated
                params = self.ckpt.load_stage_end(stage.start_from, self.model)
            rl = self.plan.is_rl(si)
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
                stepper = self._grpo_stepper(stage, si, optimizer, schedule, shardings)
            else:
                train_step = sft.make_train_step(
                    self.graphdef, optimizer, self.optim, steps, shardings, self.mesh
                )
                stepper = SFTStepper(train_step, it, self.put)
            state = self._train_stage(si, stage, state, stepper, it, start, steps, offsets[si])
            params = state["params"]
            if stage.name in keep_end:
                self.ckpt.save_stage_end(stage.name, params)
            if not self.results.evaluated(stage.name):
                self._evaluate(params, stage.name, offsets[si + 1])
            self._export(stage.name, params)
            if stage.name == self.config.train.stop_after:
                break
        self.ckpt.wait()
        if self.primary:
            c = self.config
            heading = f"{c.curriculum} curriculum, {c.domain}, seed {c.seed}: {self.wd}"
            title = f"{c.curriculum}, {c.domain}"
            report(self.results.records, self.curriculum, heading, title, self.workdir / "plots")
            self._push("plots", "tensorboard", "metrics.jsonl", "profile")
        if jax.process_count() > 1:  # no host leaves while another still writes
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("pbbjax-run-end")
        return self.results.records

    def _grpo_stepper(self, stage, si, optimizer, schedule, shardings):
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
            start = self.plan.start_of(si)
            ref = (
                self.ckpt.load_stage_end(start, self.model)
                if start
                else jax.tree.map(jnp.copy, nnx.state(self.model))
            )
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
        self.ckpt.save(global_step, state, meta, force=force)
        self._push("metrics.jsonl")  # the metrics up to the checkpoint a restart resumes from

    # -- evaluation, export, results --------------------------------------------------------------------
    def _evaluate(self, params, after: str, step: int, final: bool = True) -> list[dict]:
        """Evaluate, add the records (``after`` = the stage, ``final`` = at its end) to results.json."""
        records = evaluate(nnx.merge(self.graphdef, params), params, self.eval_job)
        stage = next((s for s in self.curriculum.stages if s.name == after), None)
        if stage is not None and (n := stage.eval_executions()) is not None:  # AD(N), demonstrations
            records = [{**r, "eval_executions": n} for r in records]
        return self.results.add(records, after, step, final)

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

    def _push(self, *names):
        """Upload these small files of a gs:// workdir's mirror (nothing to do for a local workdir)."""
        if self.primary:
            self.wd.push(*names)


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

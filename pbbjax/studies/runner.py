"""Running a study (``pbbjax.studies.catalog``): every run of every seed, resumable, then the report
(``pbbjax.studies.report``). ``python -m pbbjax.study`` is its command line."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import jax

from pbbjax.config.run_config import build_run_config
from pbbjax.config.schema import Preset
from pbbjax.studies import sharing
from pbbjax.studies.report import report
from pbbjax.studies.spec import COMMON, Arm, Run, Study
from pbbjax.training import aot
from pbbjax.training.run import train

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"
log = logging.getLogger(__name__)


def size_of(preset: str) -> str:
    return Preset.parse(preset).size


def run_preset(run: Run, preset: str) -> str:
    """The preset to load ``run``'s config file with: its GRPO variant where the run is an RL run."""
    if not run.rl:
        return preset
    return str(dataclasses.replace(Preset.parse(preset), rl=True))


def load_config(name: str, preset: str):
    path = CONFIG_DIR / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"no config file {path} (studies load the repository's configs/*.py)")
    spec = importlib.util.spec_from_file_location(f"_pbbjax_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def apply_overrides(config, overrides: dict, where: str):
    for key, value in overrides.items():
        *path, leaf = key.split(".")
        node = config
        for part in path:
            if part not in node:
                raise ValueError(f"{where}: unknown config field {key!r}")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"{where}: unknown config field {key!r}")
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def arms_of(study: Study, config_of) -> tuple[Arm, ...]:
    """The study's arms, with the exchange-rate study's AD(N) arms taken from its run's ``data.ad_n``."""
    arms = study.arms
    for run in study.runs:
        if run.config == "ad":
            arms += tuple(Arm(f"ad{n}", run.name, f"ad{n}") for n in config_of(run, 0).data.ad_n)
    return arms


def _format(value) -> str:
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def command_of(run: Run, preset: str, overrides: dict) -> str:
    flags = " ".join(f"--config.{k}={_format(v)}" for k, v in overrides.items() if k != "workdir")
    return f"python -m pbbjax.train --config configs/{run.config}.py:{run_preset(run, preset)} {flags}"


# Fields that say where and how a run executes or is watched, not what it computes: left out of the digest,
# so that a study's committed results stay valid when such a field is added or set (a pod, a weaker
# sandbox, wandb tracking, a profile, the attention kernel: every kernel computes the same attention).
NOT_DIGESTED = ("workdir", "cluster", "sandbox", "log", "profile", "model.attention")
# Fields added after results were committed, with the value that computes what the runs before them did:
# left out of the digest at that value only, so that setting them makes a new run.
DIGESTED_UNLESS = {"rl.sft_warmup_steps": 0, "train.stop_after": ""}


def canonical(config) -> dict:
    """The config as a dict, less the fields that do not change what the run computes (above)."""
    d = json.loads(config.to_json_best_effort(sort_keys=True))
    for field in (*NOT_DIGESTED, *DIGESTED_UNLESS):
        *parents, name = field.split(".")
        section = d
        for parent in parents:
            section = section.get(parent, {})
        if field in NOT_DIGESTED or section.get(name) == DIGESTED_UNLESS[field]:
            section.pop(name, None)
    return d


def digest(config) -> str:
    return hashlib.sha256(json.dumps(canonical(config), sort_keys=True).encode()).hexdigest()[:16]


class StudyRunner:
    def __init__(
        self, study: Study, preset: str, seeds: int, out: Path, workdir: Path, overrides=None, share=True
    ):
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {seeds}")
        self.study, self.preset, self.seeds = study, preset, seeds
        self.seed_values = range(study.first_seed, study.first_seed + seeds)
        self.out, self.workdir = Path(out), Path(workdir)
        self.extra = dict(overrides or {})
        self.share = share  # train stages that runs have in common once per seed (``studies/sharing.py``)
        self._keys = {}  # seed -> {run name: [(stage, key)]}
        self.size = size_of(preset)
        if self.size not in study.sizes:
            raise ValueError(
                f"study {study.name!r} has no {preset!r} size; presets: {', '.join(study.sizes)}"
            )
        self.arms = arms_of(study, self.config)

    def overrides(self, run: Run, seed: int) -> dict:
        return {
            **COMMON,
            **self.study.sizes[self.size],
            **run.overrides,
            **self.extra,
            "seed": seed,
            "workdir": str(self.workdir / run.name / f"seed{seed}"),
        }

    def config(self, run: Run, seed: int):
        config = load_config(run.config, run_preset(run, self.preset))
        return apply_overrides(config, self.overrides(run, seed), f"study {self.study.name}, run {run.name}")

    def records_path(self, run: Run, seed: int) -> Path:
        return self.out / "runs" / run.name / f"seed{seed}.json"

    def finished(self, run: Run, seed: int, config) -> bool:
        path = self.records_path(run, seed)
        if not path.exists():
            return False
        saved = json.loads(path.read_text())
        if saved.get("config_digest") != digest(config):
            raise ValueError(
                f"{path} was written by a different config of run {run.name!r} (seed {seed}); use another "
                "--out (and --workdir), or delete it to rerun"
            )
        return True

    def write_configs(self) -> None:
        for run in self.study.runs:
            first = self.seed_values[0]
            config, overrides = self.config(run, first), self.overrides(run, first)
            path = self.out / "configs" / f"{run.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {
                "command": command_of(run, self.preset, overrides),
                "config": json.loads(config.to_json_best_effort()),
            }
            path.write_text(json.dumps(data, indent=2))

    def compile_only(self, topology: str) -> int:
        """AOT-compile every run's steps for a TPU ``topology`` (``pbbjax.training.aot``); 0 if every run
        fits."""
        failed = []
        for run in self.study.runs:
            config = self.config(run, 0)
            config.compile_only_topology = topology
            print(f"== {self.study.name}: {run.name} ({command_of(run, self.preset, {})})", flush=True)
            if aot.run(build_run_config(config)):
                failed.append(run.name)
        print(
            f"\n{self.study.name} on {topology}: "
            + (f"DOES NOT FIT: {failed}" if failed else "every run fits")
        )
        return 1 if failed else 0

    def report_only(self) -> dict:
        """The comparison from the runs' records already in ``out``, training nothing."""
        todo = [(seed, run) for seed in self.seed_values for run in self.study.runs]
        missing = [
            f"{run.name} seed {seed}" for seed, run in todo if not self.records_path(run, seed).exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"--report-only: no records in {self.out / 'runs'} for {', '.join(missing)}"
            )
        return self._report(todo)

    def run(self, keep_checkpoints: bool = False) -> dict:
        self.write_configs()
        todo = [(seed, run) for seed in self.seed_values for run in self.study.runs]
        t0 = time.perf_counter()
        for i, (seed, run) in enumerate(todo, 1):
            config = self.config(run, seed)
            if self.finished(run, seed, config):
                print(f"[{i}/{len(todo)}] {self.study.name}: {run.name} seed {seed}: done before", flush=True)
                continue
            print(
                f"[{i}/{len(todo)}] {self.study.name}: {run.name} seed {seed} ({config.workdir})", flush=True
            )
            start = time.perf_counter()
            self._start_shared(run, seed, config)
            records = train(build_run_config(config))
            path = self.records_path(run, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            data = {"run": run.name, "seed": seed, "config_digest": digest(config), "records": records}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=2))
            tmp.replace(path)
            if not keep_checkpoints:
                for sub in ("checkpoints", "stage_ends"):
                    shutil.rmtree(Path(config.workdir) / sub, ignore_errors=True)
                if all(s != seed for s, _ in todo[i:]):  # this seed's last run: its shared stages too
                    shutil.rmtree(self.shared_dir(seed), ignore_errors=True)
            print(
                f"[{i}/{len(todo)}] {run.name} seed {seed}: {time.perf_counter() - start:.0f}s "
                f"(study so far {time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        return self._report(todo)

    def shared_dir(self, seed: int) -> Path:
        return self.workdir / "_shared" / f"seed{seed}"

    def _start_shared(self, run: Run, seed: int, config) -> None:
        """Where ``run`` trains its first stages as another run of this seed does and has no checkpoint yet:
        train those stages once (or find them trained) and give the run a copy to resume from."""
        workdir = Path(config.workdir)
        if not (self.share and sharing.can_share(config)) or any((workdir / "checkpoints").glob("[0-9]*")):
            return
        if seed not in self._keys:
            configs = {r.name: self.config(r, seed) for r in self.study.runs}
            self._keys[seed] = {name: sharing.stage_keys(c, canonical(c)) for name, c in configs.items()}
        keys = self._keys[seed]
        k = sharing.shared_prefix(keys, run.name)
        if not k:
            return
        stage, key = keys[run.name][k - 1]
        prefix = self.shared_dir(seed) / key
        if not (prefix / sharing.DONE).exists():
            others = [r for r, ks in keys.items() if r != run.name and (stage, key) in ks]
            print(f"  stages up to {stage!r}, shared with {', '.join(others)}: {prefix}", flush=True)
            shared = self.config(run, seed)
            shared.workdir, shared.train.stop_after = str(prefix), stage
            train(build_run_config(shared))
            (prefix / sharing.DONE).write_text(stage)
        else:
            print(f"  stages up to {stage!r} from {prefix}", flush=True)
        sharing.start_from_prefix(prefix, workdir)

    def _report(self, todo) -> dict:
        """The report over the seeds' records, indexed 0.. in seed order (the bootstraps resample them)."""
        first = self.seed_values[0]
        runs = {
            (run.name, seed - first): json.loads(self.records_path(run, seed).read_text())["records"]
            for seed, run in todo
        }
        return report(self.study, self.arms, runs, self.seeds, self.preset, self.out, first_seed=first)


def enable_compilation_cache() -> None:
    """A study compiles the same steps for every arm and seed: keep compiled programs on disk (jax's
    persistent cache) unless the user chose a cache already (``JAX_COMPILATION_CACHE_DIR``)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "pbbjax" / "jax"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

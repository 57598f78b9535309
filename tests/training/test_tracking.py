"""Weights & Biases tracking (``log.*``) and step profiling (``profile.steps``): their config checks, the
wandb run of ``MetricsLogger`` (a recording stand-in, ``tests/fakes/wandb``; the real package offline where
it is installed), and ``StepProfiler``'s trace window. End to end on the trainer: ``test_train.py``."""

import importlib.util
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import load_config
from test_metrics import read_tfrecords

from pbbjax.config.run_config import build_run_config
from pbbjax.config.sections import WandbConfig, profile_window, wandb_config
from pbbjax.training import metrics as M
from pbbjax.training.profiling import StepProfiler
from pbbjax.training.run import train
from pbbjax.training.tracking import RUN_ID_FILE

FAKES = Path(__file__).parents[1] / "fakes"


@pytest.fixture
def fake_wandb(monkeypatch):
    """``import wandb`` gives the stand-in for this test (and whatever it was before, after it)."""
    spec = importlib.util.spec_from_file_location("wandb", FAKES / "wandb" / "__init__.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def _config(**fields):
    config = load_config("configs/proactive.py:tiny")
    for key, value in fields.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_wandb_gets_every_metric_tensorboard_gets(fake_wandb, tmp_path):
    workdir = tmp_path / "proactive-arithmetic-seed0"
    settings = WandbConfig(project="pbb", entity="lab", mode="offline")
    run_config = {"seed": 0, "train": {"learning_rate": 1e-3}}
    with M.MetricsLogger(workdir, is_primary=True, wandb=settings, run_config=run_config) as log:
        log.log(1, {"loss": jnp.float32(2.5), "lr": 1e-4}, prefix="stage1/")
        log.log(2, {"loss": 2.0, "lr": 2e-4}, prefix="stage1/")
        log.log(2, {"eval/direct/accuracy": 0.5}, prefix="stage1/")
    calls = fake_wandb.calls(workdir)
    init, *logs, finish = calls
    run_id = (workdir / RUN_ID_FILE).read_text().strip()
    assert init == {
        "call": "init",
        "process": "0",
        "project": "pbb",
        "entity": "lab",
        "mode": "offline",
        "name": "proactive-arithmetic-seed0",  # the workdir's name
        "id": run_id,
        "resume": "allow",
        "config": run_config,
        "dir": str(workdir),
    }
    (event_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    tensorboard = read_tfrecords(event_file)
    sent = [(c["step"], tag, value) for c in logs for tag, value in c["data"].items()]
    assert [(step, tag) for step, tag, _ in sent] == [(step, tag) for step, tag, _ in tensorboard]
    assert [v for *_, v in sent] == pytest.approx([v for *_, v in tensorboard], rel=1e-7)  # TB: float32
    assert len(tensorboard) == 5 and finish == {"call": "finish", "exit_code": 0, "process": "0"}


def test_a_resumed_run_resumes_its_wandb_run(fake_wandb, tmp_path):
    settings = WandbConfig(project="pbb")
    for workdir in (tmp_path / "a", tmp_path / "a", tmp_path / "b"):
        with (
            pytest.raises(RuntimeError, match="stopped"),
            M.MetricsLogger(workdir, is_primary=True, wandb=settings),
        ):
            raise RuntimeError("stopped")  # a failed run is marked so
    first, again = [c for c in fake_wandb.calls(tmp_path / "a") if c["call"] == "init"]
    (other,) = [c for c in fake_wandb.calls(tmp_path / "b") if c["call"] == "init"]
    assert first["id"] == again["id"] != other["id"] and len(first["id"]) == 8
    assert first["entity"] is None and first["mode"] is None  # wandb's own defaults
    finishes = [c for c in fake_wandb.calls(tmp_path / "a") if c["call"] == "finish"]
    assert [c["exit_code"] for c in finishes] == [1, 1]


def test_only_the_primary_process_starts_a_wandb_run(fake_wandb, tmp_path):
    with M.MetricsLogger(tmp_path / "run", is_primary=False, wandb=WandbConfig(project="pbb")) as log:
        log.log(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists() and fake_wandb.calls(tmp_path / "run") == []


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_the_real_wandb_offline(tmp_path, monkeypatch):
    """The calls the stand-in records, on the real package (offline: nothing leaves the machine)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for step in (1, 2):  # the second logger resumes the first's run
        with M.MetricsLogger(tmp_path, is_primary=True, tensorboard=False, wandb=WandbConfig("pbb")) as log:
            log.log(step, {"loss": 1.0 / step}, prefix="stage1")
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    runs = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and all((run / f"run-{run_id}.wandb").stat().st_size > 0 for run in runs), sorted(
        str(p) for p in tmp_path.rglob("*")
    )


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        (dict(log__wandb="team/project"), "config field 'log.wandb' is 'team/project'"),
        (dict(log__wandb="pbb", log__wandb_mode="offlin"), "config field 'log.wandb_mode' is 'offlin'"),
        (dict(log__wandb_entity="a:b"), "config field 'log.wandb_entity'"),
        (dict(profile__steps="5"), "config field 'profile.steps' is '5': expected START,COUNT"),
        (dict(profile__steps="0,3"), "config field 'profile.steps' is '0,3'"),
        (dict(profile__steps="3,0"), "config field 'profile.steps' is '3,0'"),
        (dict(profile__steps="a,b"), "config field 'profile.steps' is 'a,b'"),
    ],
)
def test_bad_values_fail_before_any_work(fields, error, tmp_path):
    config = _config(**fields)
    config.workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace("?", r"\?")):
        train(build_run_config(config))
    assert not (tmp_path / "run").exists()


def test_wandb_asked_for_but_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    config = _config(log__wandb="pbb")
    config.workdir = str(tmp_path / "run")
    with pytest.raises(ModuleNotFoundError, match=r"'log.wandb' .* pip install 'pbbjax\[wandb\]'"):
        train(build_run_config(config))
    assert not (tmp_path / "run").exists()


def test_valid_values(fake_wandb):
    assert wandb_config(_config()) is None and profile_window(_config()) is None
    assert profile_window(_config(profile__steps="0")) is None
    assert profile_window(_config(profile__steps=" 7, 2 ")) == (7, 2)
    assert wandb_config(_config(log__wandb="pbb-runs", log__wandb_mode="disabled")) == WandbConfig(
        "pbb-runs", "", "disabled"
    )


def _traces(logdir: Path) -> list[Path]:
    return sorted(logdir.glob("plugins/profile/*/*.xplane.pb"))


def test_step_profiler_traces_its_window_and_only_where_enabled(tmp_path, capsys):
    step_fn = jax.jit(lambda x: x @ x + 1.0)
    x = jnp.ones((32, 32))

    def steps(profiler, numbers):
        nonlocal x
        for n in numbers:
            profiler.before(n)
            assert profiler._active == (profiler.enabled and 3 <= n <= 4)
            x = step_fn(x) / 32
            profiler.after(n, x)

    with StepProfiler((3, 2), tmp_path / "off", enabled=False) as p:
        steps(p, range(1, 7))
    assert not (tmp_path / "off").exists()
    with StepProfiler((3, 2), tmp_path / "on", enabled=True) as p:
        steps(p, range(1, 7))
    assert len(_traces(tmp_path / "on")) == 1
    assert "profile: traced steps 3-4 into" in capsys.readouterr().out


def test_step_profiler_window_against_the_run_length(caplog):
    p = StepProfiler((8, 4), Path("unused"), enabled=True)
    with pytest.raises(ValueError, match="'profile.steps' starts at step 8, but this run has 6 steps"):
        p.check(6)
    with caplog.at_level(logging.WARNING, logger="pbbjax.training.profiling"):
        p.check(10)
    assert "profile.steps=8,4 runs past the run's last step (10): tracing steps 8-10" in caplog.text

"""The trainer end to end on the tiny preset: kill and resume, and its errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import load_config
from safetensors.numpy import load_file

from pbbjax.config.run_config import build_run_config
from pbbjax.training.checkpoint import CheckpointMismatchError
from pbbjax.training.runner import NonFiniteLossError, Runner

ROOT = Path(__file__).parents[2]
TINY = ["--config", "configs/proactive.py:tiny", "--config.train.checkpoint_every=2"]


def _train(workdir, *extra, wait=True, env=None):
    cmd = [sys.executable, "-m", "pbbjax.train", *TINY, f"--config.workdir={workdir}", *extra]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    return out


def _final_params(workdir):
    return load_file(Path(workdir) / "export" / "stage2" / "model.safetensors")


def _logged_steps(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    out = _train(workdir)
    return workdir, out


def test_run_ends_with_a_results_table(uninterrupted):
    workdir, out = uninterrupted
    assert "after" in out and "accuracy" in out and "stage2" in out
    results = json.loads((workdir / "results.json").read_text())
    assert results["curriculum"] == "proactive" and results["domain"] == "arithmetic"
    records = results["records"]
    assert {r["after"] for r in records} == {"stage1", "stage2"}
    for r in records:
        assert r["n"] > 0 and 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1
        assert r["group"] == r["set"] and r["mode"] == "direct" and "by_length" in r
    assert (workdir / "plots" / "accuracy_by_stage.png").stat().st_size > 0
    losses = [r["stage1/loss"] for r in _logged_steps(workdir) if "stage1/loss" in r]
    assert losses[-1] < losses[0], "training lowers the loss"
    assert (workdir / "export" / "stage1" / "config.json").exists()
    assert any((workdir / "tensorboard").iterdir())


def test_sigkill_mid_stage_then_restart_ends_with_the_same_parameters(uninterrupted, tmp_path):
    proc = _train(tmp_path, wait=False)
    deadline = time.time() + 600
    ckpts = tmp_path / "checkpoints"
    while time.time() < deadline:  # kill mid-stage-1, once its first checkpoint is committed
        steps = [r for r in _logged_steps(tmp_path) if "stage1/loss" in r]
        committed = ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())
        if len(steps) >= 3 and committed:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "export" / "stage2").exists(), "the run was killed before it finished"
    out = _train(tmp_path)
    assert "resuming from checkpoint" in out
    want, got = _final_params(uninterrupted[0]), _final_params(tmp_path)
    assert want.keys() == got.keys()
    for k in want:
        assert np.array_equal(want[k], got[k]), f"{k}: max diff {np.abs(want[k] - got[k]).max()}"


def test_profile_and_wandb_change_nothing_in_the_run(uninterrupted, tmp_path):
    """profile.steps writes a jax.profiler trace of those steps, log.wandb (the recording stand-in of
    tests/fakes) gets every metric of metrics.jsonl, and the run ends exactly as the uninterrupted one."""
    fakes = str(Path(__file__).parents[1] / "fakes")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [fakes, os.environ.get("PYTHONPATH")]))}
    out = _train(tmp_path, "--config.profile.steps=2,3", "--config.log.wandb=pbb-tests", env=env)
    assert "profile: traced steps 2-4 into" in out
    assert len(list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))) == 1
    want, got = _final_params(uninterrupted[0]), _final_params(tmp_path)
    for k in want:
        assert np.array_equal(want[k], got[k]), k
    records = [json.loads((w / "results.json").read_text())["records"] for w in (uninterrupted[0], tmp_path)]
    assert records[0] == records[1]

    calls = [json.loads(line) for line in (tmp_path / "fake_wandb.jsonl").read_text().splitlines()]
    init, *logs, finish = calls
    assert init["call"] == "init" and finish == {"call": "finish", "exit_code": 0, "process": "0"}
    assert init["project"] == "pbb-tests" and init["name"] == tmp_path.name and init["resume"] == "allow"
    assert init["id"] == (tmp_path / "wandb_run_id").read_text().strip()
    config = load_config("configs/proactive.py:tiny")
    assert init["config"].keys() == config.to_dict().keys()  # the whole config, as the run saw it
    assert init["config"]["profile"] == {"steps": "2,3"} and init["config"]["workdir"] == str(tmp_path)
    assert init["config"]["train"]["checkpoint_every"] == 2
    assert [{"step": c["step"], **c["data"]} for c in logs] == _logged_steps(tmp_path)


def test_profile_starting_beyond_the_run_is_an_error_before_training(tmp_path):
    from pbbjax.models.tiny import tiny_model_dir

    config = load_config("configs/proactive.py:tiny")
    config.workdir, config.profile.steps = str(tmp_path), "999,2"
    runner = Runner(
        build_run_config(config), tiny_model_dir(config.model.tiny.to_dict(), tmp_path, config.seed)
    )
    with pytest.raises(ValueError, match=r"'profile.steps' starts at step 999, but this run has \d+ steps"):
        runner.run()
    assert _logged_steps(tmp_path) == [] and runner.ckpt.latest_step() is None


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    shutil.rmtree(workdir / "export" / "stage2")
    (workdir / "results.json").write_text(json.dumps({}))
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    newest = workdir / "checkpoints" / str(steps[-1])
    biggest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    out = _train(workdir)
    assert "is unreadable" in out and "trying an older one" in out
    want, got = _final_params(uninterrupted[0]), _final_params(workdir)
    for k in want:
        assert np.array_equal(want[k], got[k]), k


def _runner(workdir, **train):
    from pbbjax.models.tiny import tiny_model_dir

    config = load_config("configs/proactive.py:tiny")
    config.workdir = str(workdir)
    config.train.update(train)
    return Runner(
        build_run_config(config), tiny_model_dir(config.model.tiny.to_dict(), Path(workdir), config.seed)
    )


def test_checkpoint_of_a_different_model_in_the_workdir(uninterrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    shutil.rmtree(workdir / "tiny_model")
    config = load_config("configs/proactive.py:tiny")
    config.workdir = str(workdir)
    config.model.tiny.hidden_size = 32
    from pbbjax.models.tiny import tiny_model_dir

    runner = Runner(build_run_config(config), tiny_model_dir(config.model.tiny.to_dict(), workdir, 0))
    expected = r"was written for hidden_size=64, this run has hidden_size=32"
    with pytest.raises(CheckpointMismatchError, match=expected):
        runner.run()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    runner = _runner(
        tmp_path,
        learning_rate=1e30,
        max_grad_norm=0.0,
        warmup_steps=0,
        schedule="constant",
        checkpoint_every=1,
    )
    with pytest.raises(NonFiniteLossError, match=r"stage 'stage1' step \d+: loss .* is not finite; stopped"):
        runner.run()
    runner.ckpt.wait()
    assert runner.ckpt.latest_step() is not None or not any((tmp_path / "checkpoints").iterdir())


def test_unknown_config_field_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "pbbjax.train", *TINY, "--config.train.learning_rat=1e-3"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode != 0
    assert "learning_rat" in done.stderr and "learning_rate" in done.stderr


def _evaluate_cli(checkpoint, out, *extra):
    cmd = [sys.executable, "-m", "pbbjax.evaluate", *TINY[:2], f"--checkpoint={checkpoint}", f"--out={out}"]
    done = subprocess.run(cmd + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((Path(out) / "results.json").read_text())["records"]


def test_evaluate_cli_on_an_export_and_on_an_orbax_checkpoint(uninterrupted, tmp_path):
    workdir, _ = uninterrupted
    run = json.loads((workdir / "results.json").read_text())["records"]
    want = {(r["after"], r["set"]): r for r in run}
    # The HF export of stage 1, and the newest Orbax checkpoint (the end of stage 2): the same held-out
    # loss as the run measured there, so the same parameters and the same evaluation data.
    for checkpoint, stage in ((workdir / "export" / "stage1", "stage1"), (workdir, "stage2")):
        got = _evaluate_cli(checkpoint, tmp_path / stage, "--config.eval.modes=direct,zero_shot")
        assert {(r["set"], r["mode"]) for r in got} == {
            (s, m) for s in ("eval", "train") for m in ("direct", "zero_shot")
        }
        for r in got:
            assert r["loss"] == pytest.approx(want[(stage, r["set"])]["loss"], rel=1e-5)
            if r["mode"] == "direct":
                assert r["accuracy"] == want[(stage, r["set"])]["accuracy"]
        assert (tmp_path / stage / "plots" / "accuracy_by_stage.png").exists()


@pytest.mark.parametrize("scan", [False, True])
def test_remat_without_layer_scan_on_cpu_warns(scan, tmp_path, caplog):
    from pbbjax.models.tiny import tiny_model_dir

    config = load_config("configs/proactive.py:tiny")
    config.workdir = str(tmp_path)
    config.model.remat, config.model.scan_layers = "full", scan
    with caplog.at_level("WARNING", logger="pbbjax.training.runner"):
        Runner(build_run_config(config), tiny_model_dir(config.model.tiny.to_dict(), tmp_path, config.seed))
    assert ("model.remat=full without model.scan_layers" in caplog.text) is not scan

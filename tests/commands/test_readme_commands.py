"""The README's commands as a user types them, from a fresh directory with relative paths (the tiny preset
where the README shows the CPU one): each succeeds, the export CLI writes exactly the runner's own export,
the console carries no INFO-level log unless ``--verbose`` asks for it, and the table shows the guessing
floor."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = Path(__file__).parents[2]
WORKDIR = "runs/proactive-arithmetic-seed0"  # the README's (relative) default workdir
# what an INFO line looks like on stderr: absl's format, logging's, and the noise the README's users saw
INFO = re.compile(
    r"^(I\d{4} |INFO\b)|Using categorical units|fontManager|Unable to initialize backend|PyTorch was not"
    r"|Failed to find host bounds|Logging before InitGoogle",
    re.MULTILINE,
)


def _command(cwd: Path, *args: str, verbose: bool = False) -> subprocess.CompletedProcess:
    # as a user's shell has it: no JAX_PLATFORMS, nor what compile-only tests in this process set for libtpu
    leaked = ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD")
    env = {k: v for k, v in os.environ.items() if k not in leaked}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", *args, *(["--verbose"] if verbose else [])]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, " ".join(args) + "\n" + done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def here(tmp_path_factory) -> Path:
    """A fresh directory holding the configs, where the main job has run."""
    here = tmp_path_factory.mktemp("user")
    shutil.copytree(ROOT / "configs", here / "configs")
    done = _command(here, "pbbjax.train", "--config", "configs/proactive.py:tiny")
    assert not INFO.findall(done.stderr), done.stderr[-3000:]
    assert f"plot: {WORKDIR}/plots/accuracy_by_stage.png" in done.stdout
    # the table shows each set's guessing floor, as recorded in results.json
    table = done.stdout[done.stdout.index("after ") :].splitlines()
    assert table[0].split()[-3:] == ["accuracy", "ci95", "floor"]
    records = json.loads((here / WORKDIR / "results.json").read_text())["records"]
    floors = [line.split()[-1] for line in table[2 : 2 + len(records)]]
    assert floors == [f"{r['floor']:.4f}" for r in records]
    # after the table: what the stages trained on, the verdict, and two eval programs answered before/after
    story = done.stdout[done.stdout.index("What happened:") :]
    assert "never executed in training" in story and "\nVerdict: " in story
    for n in (1, 2):
        sample = story[story.index(f"Sample {n}: ") :]
        assert "True answer: " in sample and "After stage1 (" in sample and "After stage2 (" in sample
    return here


def test_evaluate_an_orbax_stage_and_an_export_with_relative_paths(here):
    cfg = ["--config", "configs/proactive.py:tiny"]
    done = _command(here, "pbbjax.evaluate", *cfg, "--checkpoint", WORKDIR, "--stage", "stage1")
    assert not INFO.findall(done.stderr), done.stderr[-3000:]
    records = json.loads((here / WORKDIR / "evaluations/stage1-step7/results.json").read_text())["records"]
    run = json.loads((here / WORKDIR / "results.json").read_text())["records"]
    run = {(r["after"], r["set"]): r for r in run}
    for r in records:  # the parameters the run evaluated at the end of stage 1
        assert r["loss"] == pytest.approx(run[("stage1", r["set"])]["loss"], rel=1e-5)
    # and --verbose brings the libraries' INFO logs back (the check above can see them)
    done = _command(here, "pbbjax.evaluate", *cfg, "--checkpoint", f"{WORKDIR}/export/stage2", verbose=True)
    assert INFO.findall(done.stderr)
    records = json.loads((here / WORKDIR / "export/stage2/evaluation/results.json").read_text())["records"]
    for r in records:
        assert r["loss"] == pytest.approx(run[("stage2", r["set"])]["loss"], rel=1e-5)


def test_export_with_relative_paths_equals_the_runners_own_export(here):
    done = _command(here, "pbbjax.export", "--checkpoint", WORKDIR, "--out", "hf-stage2")
    assert not INFO.findall(done.stderr), done.stderr[-3000:]
    assert "wrote" in done.stdout and "hf-stage2" in done.stdout
    ours, runner = here / "hf-stage2", here / WORKDIR / "export" / "stage2"
    files = sorted(p.name for p in runner.iterdir() if p.name != "evaluation")  # evaluate's, if it ran first
    assert sorted(p.name for p in ours.iterdir()) == files
    got, want = load_file(ours / "model.safetensors"), load_file(runner / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    for name in files:
        if name != "model.safetensors":  # the safetensors header may order its entries differently
            assert (ours / name).read_bytes() == (runner / name).read_bytes(), name


def test_data_with_a_relative_out(here):
    done = _command(here, "pbbjax.data", "--config", "configs/proactive.py:tiny", "--out", "pbb-data")
    assert not INFO.findall(done.stderr), done.stderr[-3000:]
    assert json.loads((here / "pbb-data" / "summary.json").read_text())

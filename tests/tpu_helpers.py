"""Shared by the tpu/ launcher tests: the example slices' flags and gcloud lines, the dry-run driver,
and a worker-like home with the worker scripts, a fake trainer and a gcloud that records its calls."""

import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tpu"))
import pbbtpu  # noqa: E402
import pbbtpu_lib  # noqa: E402, F401  (for the tests)
import pbbtpu_source  # noqa: E402, F401  (for the tests)
from pbbtpu_lib import UsageError, parse_accelerator, summarize_run  # noqa: E402, F401  (for the tests)

V5E = ["--name", "pbb-small", "--zone", "us-west4-a", "--project", "my-proj"]
V5P = ["--name", "pbb-pod", "--zone", "us-east5-a", "--project", "my-proj"]
COMMIT = "c0ffee" * 6 + "abcd"  # a --ref given in full is the run's commit as it is: nothing to look up
REPO = ["--repo", "https://github.com/me/pbbjax.git", "--ref", COMMIT]
AT_V5E = "--zone=us-west4-a --project=my-proj"
AT_V5P = "--zone=us-east5-a --project=my-proj"
CHECKOUT = (  # what setup runs on every worker: exactly the run's commit, fetched if the clone lacks it
    "set -euo pipefail; if [ ! -d pbbjax/.git ]; then git clone --quiet https://github.com/me/pbbjax.git "
    f"pbbjax; fi; git -C pbbjax cat-file -e '{COMMIT}^{{commit}}' 2>/dev/null || git -C pbbjax fetch --quiet "
    f"https://github.com/me/pbbjax.git {COMMIT}; git -C pbbjax checkout --quiet --force {COMMIT} || "
    f"{{ echo 'setup: commit {COMMIT}, the one this run started with, is not in "
    "https://github.com/me/pbbjax.git' >&2; exit 3; }; cd pbbjax && bash tpu/worker_setup.sh --python 3.11"
)
SETUP_V5E = shlex.join([
    "gcloud", "compute", "tpus", "tpu-vm", "ssh", "pbb-small", *AT_V5E.split(), "--worker=all", "--quiet",
    f"--command={CHECKOUT}",
])  # fmt: skip
POD_WORKDIR = "gs://my-bucket/runs/qwen3-14b"
POD_RUN = ["--config", "configs/proactive.py:qwen3-14b,v5p-32", "--workdir", POD_WORKDIR]
LAUNCH_POD = (
    f"gcloud compute tpus tpu-vm ssh pbb-pod {AT_V5P} --worker=all --quiet '--command=cd pbbjax && "
    f"bash tpu/worker_run.sh start --workdir {POD_WORKDIR} -- --config configs/proactive.py:qwen3-14b,v5p-32 "
    f"--config.workdir={POD_WORKDIR} --config.distributed=on'"
)
DESCRIBE_POD = f"gcloud compute tpus tpu-vm describe pbb-pod {AT_V5P} '--format=value(state)'"
STATUS_POD = (
    f"gcloud compute tpus tpu-vm ssh pbb-pod {AT_V5P} --worker=all --quiet "
    "'--command=cd pbbjax && bash tpu/worker_run.sh status'"
)
CREATE_POD = (
    f"gcloud compute tpus tpu-vm create pbb-pod {AT_V5P} --version=v2-alpha-tpuv5 --accelerator-type=v5p-32"
)
SETUP_POD = SETUP_V5E.replace("pbb-small", "pbb-pod").replace(AT_V5E, AT_V5P)
RECORD = f"{POD_WORKDIR}/pbbtpu-run.json"
PIN_POD = [f"gcloud storage cat {RECORD}", f"gcloud storage cp - {RECORD}"]  # a new run records its commit


@pytest.fixture(autouse=True)
def _no_gcloud_env(monkeypatch):
    for name in ("CLOUDSDK_CORE_PROJECT", "CLOUDSDK_COMPUTE_ZONE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def dry(capsys, *argv):
    """(exit status, command lines, note lines, stderr) of one pbbtpu call; it must run and sleep nothing."""
    capsys.readouterr()
    forbidden = AssertionError("the dry run tried to run or wait")
    with (
        mock.patch.object(subprocess, "run", side_effect=forbidden),
        mock.patch.object(subprocess, "Popen", side_effect=forbidden),
        mock.patch.object(time, "sleep"),
    ):
        rc = pbbtpu.main([argv[0], "--dry-run", *argv[1:]])
        assert not time.sleep.called
    out, err = capsys.readouterr()
    lines = out.splitlines()
    return rc, [x for x in lines if not x.startswith("#")], [x for x in lines if x.startswith("#")], err


def remote_argv(line: str) -> list[str]:
    """The argv the worker's shell runs for a printed `gcloud ... ssh ... --command=...` line."""
    command = [t for t in shlex.split(line) if t.startswith("--command=")]
    assert len(command) == 1, line
    return shlex.split(command[0].removeprefix("--command="))


class RecordingPopen:
    """In place of subprocess.Popen: each command succeeds at once, printing nothing; ``calls`` has them."""

    calls: list[list[str]] = []

    def __init__(self, cmd, **kwargs):
        self.calls.append(cmd)
        self.pid, self.returncode = 0, 0

    def communicate(self, input=None, timeout=None):
        return "", ""


NASTY = '--config.corpus=What\'s "blorp(5)"?  $HOME `id`; echo hi > pwned'


def _fake_checkout(tmp_path) -> Path:
    """A worker's home: pbbjax/tpu/ with the worker scripts; bin/ with a gcloud that records its calls."""
    home = tmp_path / "home"
    shutil.copytree(ROOT / "tpu", home / "pbbjax" / "tpu", ignore=shutil.ignore_patterns("__pycache__"))
    (home / "bin").mkdir()
    _executable(home / "bin" / "gcloud", f'#!/usr/bin/env bash\necho "$*" >> {home / "gcloud-calls"}\n')
    return home


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


FAKE_TRAINER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_ARGS"
echo "step 1 loss 2.5 on $(hostname)"
sleep "${FAKE_SLEEP:-0}"
exit "${FAKE_CODE:-0}"
"""


def _worker_env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PBB", "FAKE"))}
    fake_python = _executable(home / "bin" / "fake-python", FAKE_TRAINER)
    env.update(HOME=str(home), PATH=f"{home / 'bin'}:{env['PATH']}", PBB_PYTHON=str(fake_python))
    env.update(FAKE_ARGS=str(home / "trainer-args"), PBB_SYNC_SECONDS="1", **extra)
    return env


def _worker(home: Path, env: dict, *args: str) -> str:
    cmd = ["bash", "pbbjax/tpu/worker_run.sh", *args]
    return subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, check=True).stdout


def _wait_for(home, env, wanted: str, timeout=30.0) -> str:
    deadline = time.monotonic() + timeout
    while wanted not in (out := _worker(home, env, "status")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert wanted in out, out
    return out


FAKE_GCLOUD = """#!/usr/bin/env bash
# Answers describe with the next line of $FAKE_DIR/states and status with the next of $FAKE_DIR/runs
# ("hang": two workers answer, then nothing); keeps the run record in $FAKE_DIR/record. With $FAKE_HOME,
# a worker's home: create empties it, scp copies there and setup's command runs there.
echo "$*" >> "$FAKE_DIR/calls"
pop() { head -n 1 "$FAKE_DIR/$1"; sed -i 1d "$FAKE_DIR/$1"; }
case "$*" in
  "storage cat "*)
    if cat "$FAKE_DIR/record" 2>/dev/null; then exit 0; fi
    echo "ERROR: (gcloud.storage.cat) The following URLs matched no objects or files:" >&2
    exit 1 ;;
  "storage cp - "*) cat > "$FAKE_DIR/record" ;;
  *" describe "*)
    state=$(pop states)
    if [ -z "$state" ]; then sleep 600; fi  # none left: a test whose watch never ends fails by timeout
    if [ "$state" != NOT_FOUND ]; then echo "$state"; exit 0; fi
    echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'pbb-pod' was not found" >&2
    exit 1 ;;
  *" create "*) if [ -n "${FAKE_HOME:-}" ]; then rm -rf "$FAKE_HOME"; mkdir -p "$FAKE_HOME"; fi ;;
  *" delete "*) if [ -f "$FAKE_DIR/on-delete" ]; then bash "$FAKE_DIR/on-delete"; fi ;;
  *" scp "*) if [ -n "${FAKE_HOME:-}" ]; then cp "$5" "$FAKE_HOME/${6#*:}"; fi ;;
  *"worker_setup.sh"*)
    if [ -n "${FAKE_HOME:-}" ]; then
      for arg; do case $arg in --command=*) command=${arg#--command=} ;; esac; done
      cd "$FAKE_HOME" && HOME=$FAKE_HOME bash -c "$command"
    fi ;;
  *"worker_run.sh status"*)
    run=$(pop runs)
    if [ "$run" = hang ]; then
      echo "pbbjax-status t1v-n-0-w-0 running"
      echo "pbbjax-status t1v-n-0-w-1 running"
      sleep 600 &
      echo $! > "$FAKE_DIR/hung"
      wait
    fi
    for w in 0 1 2 3; do echo "pbbjax-status t1v-n-0-w-$w $run"; done ;;
esac
"""


def fake_gcloud(tmp_path, monkeypatch, states: str, runs: str = "") -> Path:
    """FAKE_GCLOUD first on PATH, answering from ``states`` and ``runs`` (comma-separated)."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    _executable(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
    (tmp_path / "states").write_text("".join(f"{s}\n" for s in states.split(",")))
    (tmp_path / "runs").write_text("".join(f"{r}\n" for r in runs.split(",") if r))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return tmp_path

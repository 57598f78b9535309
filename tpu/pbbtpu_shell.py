"""How pbbtpu runs commands: each under a timeout for its kind of call, in its own process group so that a
timed-out ``gcloud`` takes its ssh children with it; with ``--dry-run``, printed instead of run."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time

from pbbtpu_lib import UsageError

# Seconds each kind of call may take before it is stopped and counted as a failure; --timeout KIND=SECONDS.
TIMEOUTS = {
    "describe": 120,  # gcloud ... describe: the TPU's state
    "ssh": 300,  # worker_run.sh start / status / stop / logs on every worker
    "setup": 3600,  # the checkout, then worker_setup.sh installing jax[tpu] on every worker
    "scp": 1800,  # --from-local: the source archive to every worker
    "create": 3600,  # tpu-vm create returns once the VM is up
    "delete": 1800,
    "start": 1800,
    "storage": 1800,  # gcloud storage: the run record, logs --fetch
    "git": 300,  # on this machine: git ls-remote (network), status, rev-parse, archive
}


def parse_timeouts(items: list[str]) -> dict[str, float]:
    timeouts = dict(TIMEOUTS)
    for item in items:
        kind, _, seconds = item.partition("=")
        try:
            value = float(seconds)
        except ValueError:
            value = -1.0
        if kind not in TIMEOUTS or value <= 0:
            kinds = ", ".join(TIMEOUTS)
            raise UsageError(f"--timeout: {item!r} is not KIND=SECONDS, SECONDS > 0, KIND one of {kinds}")
        timeouts[kind] = value
    return timeouts


class Failed(Exception):
    """The cloud said no (a TPU that cannot come up, a run that keeps failing): exit status 1."""


class CallFailed(Failed):
    """A command that exited non-zero (``returncode``) or ran past its timeout (``seconds``)."""

    def __init__(self, kind: str, shown: list[str], *, returncode=None, seconds=None, output=""):
        self.kind, self.returncode, self.seconds, self.output = kind, returncode, seconds, output
        worker = next((t.split("=", 1)[1] for t in shown if t.startswith("--worker=")), None)
        where = f" on worker {worker}" if worker else ""
        if seconds is None:
            what = f"exit status {returncode}{where} from"
        else:
            what = f"{kind} call timed out after {seconds:g}s{where} (--timeout {kind}=SECONDS); stopped"
        super().__init__(f"{what}: {shlex.join(shown)}")

    def add(self, detail: str) -> None:
        self.args = (f"{self.args[0]}; {detail}",)

    @property
    def timed_out(self) -> bool:
        return self.seconds is not None


class Shell:
    """Runs commands; with ``dry_run`` prints them (one per line, shell-quoted) and runs nothing."""

    def __init__(self, dry_run: bool, timeouts: dict[str, float] | None = None):
        self.dry_run, self.timeouts = dry_run, timeouts or dict(TIMEOUTS)
        self.clock = 0.0  # a dry run's time: the sleeps it pretended

    def run(self, cmd, *, kind: str | None, display=None, capture=False, check=True, input=None):
        """``kind`` picks the timeout; None only for what the user stops by hand (``logs --follow``)."""
        shown = display or cmd
        if self.dry_run:
            print(shlex.join(shown), flush=True)
            return None
        print(f"+ {shlex.join(shown)}", file=sys.stderr, flush=True)
        limit = self.timeouts[kind] if kind else None
        pipe = subprocess.PIPE if capture else None
        proc = subprocess.Popen(
            cmd, text=True, start_new_session=True, stdout=pipe, stderr=pipe,
            stdin=subprocess.PIPE if input is not None else None,
        )  # fmt: skip
        try:
            out, err = proc.communicate(input, timeout=limit)
        except subprocess.TimeoutExpired:
            out, _ = _stop(proc)
            raise CallFailed(kind, shown, seconds=limit, output=out or "") from None
        except BaseException:  # Ctrl-C: the command has its own process group, so stop it here
            _stop(proc)
            raise
        if check and proc.returncode:
            if err:
                sys.stderr.write(err)
            raise CallFailed(kind, shown, returncode=proc.returncode)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def note(self, text: str) -> None:
        print(f"# {text}", file=sys.stdout if self.dry_run else sys.stderr, flush=True)

    def sleep(self, seconds: float) -> None:
        if self.dry_run:
            self.note(f"sleep {seconds:g}s")
            self.clock += seconds
        else:
            time.sleep(seconds)

    def now(self) -> float:
        return self.clock if self.dry_run else time.monotonic()


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM to the command's whole process group, SIGKILL 5 s later; what it printed until then."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    proc.wait()  # a process outside the group still holds the pipes: stop reading them
    return "", ""

"""Run program source in a separate Python process with time and memory limits and no network.

Code from data sets (and every program whose output becomes a training target) runs here, never in the
trainer's process. ``run_calls(source, entry_point, calls)`` executes ``source`` once in a fresh
``python -I`` subprocess, then calls ``entry_point(*args)`` for each argument list, each call under its own
time limit. Results come back as JSON; a call that raises, times out, kills the process or returns
something JSON cannot encode gets an error instead of a value, and the remaining calls still run (in a
new process if the old one died).

Isolation is best effort, not a security boundary: the child has an address-space limit, no core dumps,
``socket`` disabled, and its stdout/stdin detached from the protocol pipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

_CHILD = r"""
import io, json, os, resource, signal, socket, sys
out = os.fdopen(os.dup(1), "w")
sys.stdout = sys.stderr = io.StringIO()
sys.stdin = io.StringIO()
job = json.loads(os.fdopen(0).read())
resource.setrlimit(resource.RLIMIT_AS, (job["memory_bytes"], job["memory_bytes"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
def _no_network(*a, **k):
    raise PermissionError("network access is disabled in the sandbox")
socket.socket = socket.create_connection = socket.getaddrinfo = _no_network
class _Timeout(BaseException):
    pass
def _alarm(*a):
    raise _Timeout()
signal.signal(signal.SIGALRM, _alarm)
namespace = {"__name__": "__sandbox__"}
def emit(**r):
    out.write(json.dumps(r) + "\n"); out.flush()
try:
    signal.setitimer(signal.ITIMER_REAL, job["timeout_s"])
    exec(compile(job["source"], "<program>", "exec"), namespace)
    signal.setitimer(signal.ITIMER_REAL, 0)
    fn = namespace[job["entry_point"]]
except _Timeout:
    emit(setup_error="timeout while loading the program"); sys.exit(0)
except BaseException as e:
    emit(setup_error=f"{type(e).__name__}: {e}"); sys.exit(0)
for args in job["calls"]:
    try:
        signal.setitimer(signal.ITIMER_REAL, job["timeout_s"])
        value = fn(*args)
        signal.setitimer(signal.ITIMER_REAL, 0)
        emit(value=json.loads(json.dumps(value)))
    except _Timeout:
        emit(error="timeout")
    except BaseException as e:
        signal.setitimer(signal.ITIMER_REAL, 0)
        emit(error=f"{type(e).__name__}: {e}"[:500])
"""


@dataclasses.dataclass(frozen=True)
class CallResult:
    value: Any = None
    error: str | None = None  # "timeout", "TypeError: ...", "process died: ..."

    @property
    def ok(self) -> bool:
        return self.error is None


class SandboxSetupError(RuntimeError):
    """The program itself failed to load (syntax error, import error, missing entry point, timeout)."""


def run_calls(
    source: str,
    entry_point: str,
    calls: list[list],
    *,
    timeout_s: float = 2.0,
    memory_bytes: int = 2 * 1024**3,
) -> list[CallResult]:
    """Call ``entry_point(*args)`` for each ``args`` in ``calls``, defined by ``source``, in a subprocess."""
    results: list[CallResult] = []
    while len(results) < len(calls):
        pending = calls[len(results) :]
        job = dict(
            source=source,
            entry_point=entry_point,
            calls=pending,
            timeout_s=timeout_s,
            memory_bytes=memory_bytes,
        )
        lines, died = _run_child(job, wall_s=5.0 + timeout_s * (len(pending) + 1))
        for line in lines:
            if "setup_error" in line:
                raise SandboxSetupError(f"program with entry point {entry_point!r}: {line['setup_error']}")
            results.append(CallResult(value=line.get("value"), error=line.get("error")))
        if len(results) < len(calls) and died:
            results.append(CallResult(error=f"process died: {died}"))  # the call that was running
    return results


def _run_child(job: dict, wall_s: float) -> tuple[list[dict], str | None]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-I", "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        stdout, _ = proc.communicate(json.dumps(job), timeout=wall_s)
        died = None if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, _ = proc.communicate()
        died = "timeout (killed)"
    lines = []
    for raw in stdout.splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            break
    if died is None and len(lines) < len(job["calls"]) and not any("setup_error" in x for x in lines):
        died = "exited early"
    return lines, died

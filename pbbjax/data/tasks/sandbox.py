"""Run program source from data sets in a sandbox: no network, a read-only filesystem, bounded resources.

``run_calls(source, entry_point, calls)`` executes ``source`` once in a fresh ``python -I`` process
(``sandbox_child.py``), then calls ``entry_point(*args)`` for each argument list, each call under its own
time limit. Results come back as JSON; a call that raises, times out, kills its process, is refused by
the sandbox or returns something JSON cannot encode gets an error instead of a value, and the remaining
calls still run (in a new process if the old one died).

Every place where code from data runs goes through ``run_calls`` (``tests/data/test_sandbox.py`` scans the
package for any other way to run code and fails on it):
- ground-truth targets: ``ArithmeticDomain.execute_many`` (generated programs, compositions),
  ``CiphersDomain.execute``, ``LeetcodeDomain.execute`` (kzleet or the user's ``corpus``);
- screening a corpus and probing inputs: ``leetcode.screen``, ``LeetcodeDomain.sample_inputs``.
Scoring and rewards (``Domain.score``/``recall``, GRPO's reward in ``training/rollout.py``, evaluation)
compare answers as JSON or text, and grammars are parsed by lark: none of them executes code.

Strict mode (the default, config field ``sandbox``) guarantees, on a Linux kernel that allows
unprivileged user namespaces and has Landlock (5.13 or later):
- no network: the program runs in its own network namespace (not even localhost or a metadata server
  is reachable), may not create sockets at all (seccomp; this also shuts pathname Unix sockets, which a
  network namespace does not), and, on Landlock ABI 4 or later, may not use TCP;
- a read-only view of the Python installation and system libraries (``/usr``, ``/lib``), and nothing else
  of the filesystem: no home directory, workdir, credentials or ``/proc``; it may write only in its
  current directory, a fresh tmpfs of ``disk_bytes`` (``$HOME`` and ``$TMPDIR`` point there) that only it
  sees and that disappears with it; it may not execute files;
- no reach into the host: its own PID namespace (it sees no process of the caller's; on Landlock ABI 6 or
  later, signals beyond the sandbox are refused too; Landlock refuses ptrace beyond it), its own IPC
  namespace (no System V shared memory or message queues of the host), no kernel keyrings (seccomp), no
  capabilities, no_new_privs;
- limits: ``memory_bytes`` of address space, ``disk_bytes`` per file, no new processes (threads are
  allowed; their stacks count against the memory limit), CPU time (a call that spins in C past twice
  its time limit is killed), 1 MiB of printed text (discarded), no core dumps; the caller waits at most
  a wall-clock bound and then kills the whole process group, and the kernel kills whatever is left in
  the PID namespace;
- a scrubbed environment (``PATH``, ``HOME``, ``TMPDIR`` only).
Where the kernel refuses any of these, ``run_calls`` raises ``SandboxUnavailable`` naming the mechanism and
the config field; the first refusal is remembered for the process. It never weakens by itself.

It does not guarantee: protection from kernel bugs (it shares the host's kernel: this is not a VM); that
the Python installation and system libraries stay secret (they are readable); that the program's results
are honest (it may write anything to its results, and in one ``run_calls`` the programs batched together
share a process); or a bound on time below the caller's wall clock for a program that blocks without
using CPU. Weak mode (``sandbox="weak"``) is a plain subprocess with the same resource limits, scrubbed
environment and ``socket`` replaced in Python: no isolation from the network, the disk or the host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODES = ("strict", "weak")
_CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_mode = "strict"
_refused: dict[str, str] = {}  # mode -> why the kernel refused it, found by the first run in this process


@dataclasses.dataclass(frozen=True)
class CallResult:
    value: Any = None
    error: str | None = None  # "timeout", "TypeError: ...", "process died: ..."

    @property
    def ok(self) -> bool:
        return self.error is None


class SandboxSetupError(RuntimeError):
    """The program itself failed to load (syntax error, import error, missing entry point, timeout)."""


class SandboxUnavailable(RuntimeError):
    """The kernel refused a mechanism of the strict sandbox; no program from data runs."""


def set_mode(mode: str) -> None:
    """Choose the sandbox for this process: "strict" (the default) or "weak" (config field ``sandbox``)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"config field 'sandbox' is {mode!r}: expected one of {', '.join(MODES)}")
    _mode = mode


def current_mode() -> str:
    return _mode


def run_calls(
    source: str,
    entry_point: str,
    calls: list[list],
    *,
    timeout_s: float = 2.0,
    memory_bytes: int = 2 * 1024**3,
    disk_bytes: int = 64 * 1024**2,
) -> list[CallResult]:
    """Call ``entry_point(*args)`` for each ``args`` in ``calls``, defined by ``source``, in the sandbox.

    ``disk_bytes`` bounds the temporary directory (strict mode), every file written and the results.
    Raises ``SandboxUnavailable`` where the kernel refuses the strict sandbox, ``SandboxSetupError`` where
    the program does not load.
    """
    if _mode in _refused:
        raise SandboxUnavailable(_refused[_mode])
    results: list[CallResult] = []
    while len(results) < len(calls):
        pending = calls[len(results) :]
        job = dict(
            source=source,
            entry_point=entry_point,
            calls=pending,
            timeout_s=timeout_s,
            memory_bytes=memory_bytes,
            disk_bytes=disk_bytes,
            strict=_mode == "strict",
        )
        lines, died, refusal = _run_child(job, 5.0 + timeout_s * (len(pending) + 1), results_bytes=disk_bytes)
        if refusal:
            _refuse(refusal)
        for line in lines:
            if "setup_error" in line:
                raise SandboxSetupError(f"program with entry point {entry_point!r}: {line['setup_error']}")
            results.append(CallResult(value=line.get("value"), error=line.get("error")))
        if len(results) < len(calls) and died:
            results.append(CallResult(error=f"process died: {died}"))  # the call that was running
    return results


def _refuse(why: str) -> None:
    message = (
        f"the kernel refused the sandbox that code from data sets runs in: {why}. No program runs "
        "without it. To run them anyway in a plain subprocess with resource limits only (no network, "
        "filesystem or host isolation), set the config field 'sandbox' to 'weak' (--config.sandbox=weak)."
    )
    _refused.setdefault(_mode, message)  # atomic: screening threads may get here together
    raise SandboxUnavailable(message)


def _run_child(job: dict, wall_s: float, results_bytes: int) -> tuple[list[dict], str | None, str]:
    """The child's result lines, how it died (None if it exited normally), and the kernel's refusal."""
    with tempfile.TemporaryDirectory(prefix="pbbjax-sandbox-", ignore_cleanup_errors=True) as directory:
        work = Path(directory, "work")
        work.mkdir(mode=0o700)
        Path(directory, "job.json").write_text(json.dumps(job))
        Path(directory, "results").touch()
        Path(directory, "refused").touch()
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(work), "TMPDIR": str(work)}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", _CHILD, directory],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            cwd=directory,
            start_new_session=True,  # its own process group, killed whole on timeout
        )
        pidfd = os.pidfd_open(proc.pid)  # readable once it exits (Popen.wait polls, adding latency)
        try:
            exited = select.select([pidfd], [], [], wall_s)[0]
        finally:
            os.close(pidfd)
        if exited:
            code = proc.wait()
            died = None if code == 0 else _describe(code)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            died = "timeout (killed)"
        with open(Path(directory, "results"), "rb") as f:
            text = f.read(results_bytes).decode(errors="replace")
        with open(Path(directory, "refused"), "rb") as f:
            refusal = f.read(4096).decode(errors="replace")
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            break
    if died is None and len(lines) < len(job["calls"]) and not any("setup_error" in x for x in lines):
        died = "exited early"
    return lines, died, refusal


def _describe(code: int) -> str:
    """The child's exit: its own code, or the signal that killed the program (relayed as 128 + N)."""
    try:
        name = signal.Signals(-code if code < 0 else code - 128).name
    except ValueError:
        return f"exit code {code}"
    return f"killed by {name}" + (" (CPU time limit)" if name in ("SIGPROF", "SIGXCPU") else "")

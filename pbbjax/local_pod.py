"""``python -m pbbjax.local_pod --processes 2 --devices 4 -- python -m pbbjax.train --config ...``:
simulate a multi-host pod on one machine.

Starts ``--processes`` copies of the command, each a JAX process with ``--devices`` simulated CPU devices,
joined by ``jax.distributed`` through a coordinator on localhost (gloo collectives). Each copy gets
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` in its environment, which
``pbbjax.core.distributed.initialize`` reads (config fields ``cluster.*`` may give them instead); on a real
pod none of this is needed, ``jax.distributed.initialize()`` finds the TPU hosts itself.

Process 0's output passes through; every other process's lines are prefixed with ``[process i]``. When
one process fails, the others get ``--grace`` seconds to fail too (a collective they wait in times out on
its own) and are then killed, so a dead host never leaves the rest hanging. SIGTERM and SIGINT are
forwarded to every process (how a preempted pod is told to save and stop); if the launcher itself is
killed, the kernel kills every process (Linux's parent-death signal). The exit status is the first
failing process's, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

# Each process is started through this: it asks the kernel to SIGKILL it when the launcher dies (even by
# SIGKILL, which the launcher cannot forward), then becomes the command. No orphaned hosts keep running.
_DIE_WITH_LAUNCHER = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); "  # 1: PR_SET_PDEATHSIG
    "os.execvp(sys.argv[1], sys.argv[1:])"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, count: int, devices: int, address: str, base: dict | None = None) -> dict:
    """The environment of simulated host ``index``: its identity in the pod and its CPU devices."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env.update(
        JAX_COORDINATOR_ADDRESS=address,
        JAX_NUM_PROCESSES=str(count),
        JAX_PROCESS_ID=str(index),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
    )
    return env


def _pump(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
    stream.close()


def run(
    command: list[str],
    processes: int,
    devices: int,
    *,
    port: int | None = None,
    grace: float = 60.0,
    timeout: float | None = None,
    cwd: str | None = None,
    env: dict | None = None,
) -> int:
    """Run ``command`` as a ``processes``-host pod of ``devices`` CPU devices each; its exit status.

    ``timeout``: kill every process after this many seconds (exit status 124)."""
    if processes < 1 or devices < 1:
        raise ValueError(f"processes ({processes}) and devices ({devices}) must be >= 1")
    address = f"127.0.0.1:{port or free_port()}"
    procs, pumps = [], []
    for i in range(processes):
        p = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_LAUNCHER, *command],
            env=process_env(i, processes, devices, address, env),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,  # a signal to one host's group reaches its children, not ours
        )
        procs.append(p)
        prefix = "" if i == 0 else f"[process {i}] "
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, out, prefix), daemon=True)
            t.start()
            pumps.append(t)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = _wait(procs, grace, timeout)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    return status


def _wait(procs, grace: float, timeout: float | None) -> int:
    start, failed_at, status = time.monotonic(), None, 0
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if not status:
            for i, p in enumerate(procs):
                if p.returncode:
                    status, failed_at = p.returncode, now
                    print(f"local_pod: process {i} exited with status {p.returncode}", file=sys.stderr)
                    break
        if failed_at is not None and now - failed_at > grace:
            alive = [i for i, p in enumerate(procs) if p.poll() is None]
            print(f"local_pod: killing processes {alive}, still running {grace:.0f} s after a failure",
                  file=sys.stderr)  # fmt: skip
            break
        if timeout is not None and now - start > timeout:
            print(f"local_pod: timed out after {timeout:.0f} s; killing every process", file=sys.stderr)
            return 124
        time.sleep(0.1)
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pbbjax.local_pod",
        description="Run a command as a simulated multi-host pod: N JAX processes x M CPU devices.",
    )
    parser.add_argument("--processes", "-n", type=int, default=2, help="simulated hosts (JAX processes)")
    parser.add_argument("--devices", "-d", type=int, default=4, help="CPU devices per process")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds the others get after a failure")
    parser.add_argument("--timeout", type=float, default=None, help="kill everything after this many s")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error(
            "give the command after --, e.g. -- python -m pbbjax.train --config configs/proactive.py"
        )
    return run(command, args.processes, args.devices, port=args.port, grace=args.grace, timeout=args.timeout)


if __name__ == "__main__":
    sys.exit(main())

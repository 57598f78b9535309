"""Running pbbjax commands on a simulated pod (``python -m pbbjax.local_pod``) and comparing runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).parent.parent
TIMEOUT = 600  # seconds a whole pod command may take before the test fails (never hangs CI)


def env() -> dict:
    out = dict(os.environ)
    out.pop("XLA_FLAGS", None)  # local_pod sets each process's device count
    out.update(HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return out


def pod_command(processes: int, devices: int, *command: str, grace: float = 30) -> list[str]:
    return [
        sys.executable, "-m", "pbbjax.local_pod", "-n", str(processes), "-d", str(devices),
        "--grace", str(grace), "--timeout", str(TIMEOUT - 30), "--", sys.executable, "-m", *command,
    ]  # fmt: skip


def run_pod(processes: int, devices: int, *command: str, check: bool = True, **kw):
    done = subprocess.run(
        pod_command(processes, devices, *command, **kw),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if check:
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    return done


def pod_script_results(name: str, *args: str, out_dir: Path) -> dict[int, dict[str, np.ndarray]]:
    """``tests/pod_scripts/<name>.py *args OUT`` on a 2-host pod (2 processes x 4 devices) and on one process
    of 8 devices; the script's process 0 writes arrays to OUT (an .npz file). -> {processes: its arrays}."""
    script = str(ROOT / "tests" / "pod_scripts" / f"{name}.py")
    results = {}
    for processes, devices in ((2, 4), (1, 8)):
        out = out_dir / f"{name}-{processes}x{devices}.npz"
        cmd = [sys.executable, "-m", "pbbjax.local_pod", "-n", str(processes), "-d", str(devices),
               "--timeout", "300", "--", sys.executable, script, *args, str(out)]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=360)
        assert done.returncode == 0, done.stderr[-4000:]
        results[processes] = dict(np.load(out))
    return results


def start_pod(processes: int, devices: int, *command: str) -> subprocess.Popen:
    return subprocess.Popen(
        pod_command(processes, devices, *command),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, at_least: int, timeout: float = 300) -> int:
    """The first committed checkpoint step >= ``at_least`` (polling the workdir), while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if any(s >= at_least for s in steps):
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"the pod ended ({proc.returncode}) first:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    kill(proc)
    raise AssertionError(f"no checkpoint >= {at_least} within {timeout} s")


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    """``sig`` to the launcher's whole session: the launcher and every process of the pod."""
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def pod_processes(marker: str) -> dict[int, str]:
    """{pid: JAX_PROCESS_ID} of the running processes whose command line holds ``marker``."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours
            continue
        ids = [e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"JAX_PROCESS_ID=")]
        if marker.encode() in cmdline and ids and b"pbbjax.train" in cmdline:
            out[int(proc.name)] = ids[0]
    return out


def tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    index = hf_dir / "model.safetensors.index.json"
    files = (
        set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    )
    return {k: v for f in files for k, v in load_file(hf_dir / f).items()}


def assert_close_tensors(a: Path, b: Path, rtol: float = 1e-5) -> None:
    """Every tensor equal within ``rtol`` of its scale (the largest magnitude of the reference)."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        scale = max(float(np.abs(tb[k]).max()), 1e-12)
        err = float(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)).max())
        assert err <= rtol * scale, f"{k}: max |diff| {err:.3g} > {rtol} x scale {scale:.3g}"


def assert_equal_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert np.array_equal(ta[k], tb[k]), k


def accuracies(workdir: Path) -> list[tuple]:
    records = json.loads((workdir / "results.json").read_text())["records"]
    return sorted((r["after"], r["set"], r["mode"], r["n"], r.get("accuracy")) for r in records)


def losses(workdir: Path) -> dict:
    records = json.loads((workdir / "results.json").read_text())["records"]
    return {(r["after"], r["set"], r["mode"]): r["loss"] for r in records}

"""What pbbtpu knows: TPU slices and their states, the gcloud and worker command lines, and input checks.

Pure functions of the parsed options (an ``argparse.Namespace``); nothing here runs a command.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the pbbjax checkout this file belongs to
REMOTE_ARCHIVE = "pbbjax-src.tar.gz"  # where setup --from-local puts the source on each worker (home dir)


class UsageError(Exception):
    """Bad input: printed as one line naming the option and what was expected."""


# -- accelerators ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # v5e
    prefix: str  # the accelerator type as gcloud spells it is f"{prefix}-{size}": v5litepod-8
    runtime: str  # the TPU software version Google documents for JAX on this generation
    cores_per_chip: int  # the size counts TensorCores on v4 and v5p (2 per chip), chips on v5e and v6e
    sizes: tuple[int, ...]  # () = any multiple of 8 up to max_size
    max_size: int
    single_host_chips: int  # slices of up to this many chips are one VM; larger ones have 4 chips per VM


GENERATIONS = (
    Generation("v4", "v4", "tpu-ubuntu2204-base", 2, (), 8192, 4),
    Generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", 1, (1, 4, 8, 16, 32, 64, 128, 256), 256, 8),
    Generation("v5p", "v5p", "v2-alpha-tpuv5", 2, (), 17920, 4),
    Generation("v6e", "v6e", "v2-alpha-tpuv6e", 1, (1, 4, 8, 16, 32, 64, 128, 256), 256, 8),
)
CHIPS_PER_HOST = 4  # on every multi-host slice of these generations


@dataclasses.dataclass(frozen=True)
class Accelerator:
    type: str  # canonical gcloud name: v5litepod-8, v5p-32
    generation: Generation
    chips: int

    @property
    def pod_name(self) -> str:
        """The name pbbjax's presets give this slice (v5e-16 for v5litepod-16)."""
        return self.type.replace("v5litepod-", "v5e-")

    @property
    def hosts(self) -> int:
        single = self.chips <= self.generation.single_host_chips
        return 1 if single else self.chips // CHIPS_PER_HOST


def parse_accelerator(text: str) -> Accelerator:
    """``v5p-32``, ``v5litepod-8`` (alias ``v5e-8``), ``v6e-8``, ``v4-8``...; anything else is an error."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text.strip().lower())
    prefix = {"v5e": "v5litepod"}.get(m.group(1), m.group(1)) if m else None
    gen = next((g for g in GENERATIONS if g.prefix == prefix), None)
    known = ", ".join(f"{g.name} ({g.prefix}-8 ...)" for g in GENERATIONS)
    if gen is None:
        raise UsageError(f"--accelerator: unknown accelerator type {text!r}; generations: {known}")
    size = int(m.group(2))
    valid = size in gen.sizes if gen.sizes else (size % 8 == 0 and 0 < size <= gen.max_size)
    if not valid:
        sizes = ", ".join(map(str, gen.sizes)) if gen.sizes else f"multiples of 8 up to {gen.max_size}"
        raise UsageError(f"--accelerator: {text!r} is not a {gen.name} slice; sizes: {sizes}")
    return Accelerator(f"{gen.prefix}-{size}", gen, size // gen.cores_per_chip)


# -- TPU states ----------------------------------------------------------------------------------------------

READY = {"READY", "ACTIVE"}  # a node / a queued resource that can run work
LOST = {"PREEMPTED", "TERMINATED", "SUSPENDED", "FAILED", "NOT_FOUND"}  # only recreating helps
STOPPED = {"STOPPED"}  # an on-demand VM that was stopped: start it
WAITING = {  # transitional: check again later
    "CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "STOPPING", "DELETING", "ACCEPTED",
    "PROVISIONING", "WAITING_FOR_RESOURCES", "SUSPENDING", "HIDING", "HIDDEN", "UNHIDING", "UNKNOWN",
}  # fmt: skip
RUN_STATES = ("running", "done", "failed", "absent", "unknown")


def parse_fakes(text: str | None, valid, flag: str) -> list[str] | None:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in valid]
    if bad:
        raise UsageError(
            f"{flag}: unknown state(s) {', '.join(bad)}; expected some of {', '.join(sorted(valid))}"
        )
    return items


def summarize_run(output: str, hosts: int) -> str:
    """One state for the whole run from the ``pbbjax-status HOST STATE [CODE]`` lines of every worker."""
    states = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "pbbjax-status":
            states[parts[1]] = " ".join(parts[2:])
    if any(s.startswith("exited") and s != "exited 0" for s in states.values()):
        return "failed"
    if len(states) >= hosts and all(s == "exited 0" for s in states.values()):
        return "done"
    if any(s == "running" for s in states.values()):
        return "running"
    return "absent" if states else "unknown"


class RestartBudget:
    """At most ``limit`` failures in any ``window`` seconds. Failures older than the window stop counting,
    so a run that fails now and then (preemption notices days apart) never runs out of restarts, while
    one that fails over and over stops soon."""

    def __init__(self, limit: int, window: float):
        self.limit, self.window, self.times = limit, window, []

    def spend(self, now: float) -> bool:
        """Count a failure at time ``now``; False when that makes too many within the window."""
        self.times = [t for t in self.times if now - t < self.window] + [now]
        return len(self.times) <= self.limit


# -- gcloud commands -------------------------------------------------------------------------------------


def _where(a) -> list[str]:
    return [f"--zone={a.zone}", f"--project={a.project}"]


def ssh(a, command: str, worker="all") -> list[str]:
    extra = ["--internal-ip"] if a.internal_ip else []
    head = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", a.name, *_where(a), f"--worker={worker}"]
    return [*head, *extra, "--quiet", f"--command={command}"]


def worker_script(a, *args: str, env: list[str] = ()) -> str:
    """A command line that runs tpu/worker_run.sh in the worker's checkout (with NAME=VALUE ``env``)."""
    prefix = ["env", *env] if env else []
    return f"cd {shlex.quote(a.remote_dir)} && " + shlex.join([*prefix, "bash", "tpu/worker_run.sh", *args])


def create_commands(a, acc: Accelerator) -> list[list[str]]:
    version = a.version or acc.generation.runtime
    tier = {"on-demand": [], "spot": ["--spot"], "preemptible": ["--preemptible"], "reserved": ["--reserved"]}
    shape = [f"--accelerator-type={acc.type}", *tier[a.provisioning], *a.create_arg]
    if a.queued:
        qr = ["gcloud", "compute", "tpus", "queued-resources", "create", a.name, f"--node-id={a.name}"]
        return [[*qr, *_where(a), f"--runtime-version={version}", *shape]]
    return [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", a.name, *_where(a), f"--version={version}", *shape]
    ]


def start_command(a) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "start", a.name, *_where(a)]


def describe_command(a) -> list[str]:
    if a.queued:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", a.name, *_where(a),
                "--format=value(state.state)"]  # fmt: skip
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", a.name, *_where(a), "--format=value(state)"]


def delete_command(a) -> list[str]:
    if a.queued:  # --force also deletes the queued resource's TPU
        qr = ["gcloud", "compute", "tpus", "queued-resources", "delete", a.name]
        return [*qr, *_where(a), "--force", "--quiet"]
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", a.name, *_where(a), "--quiet"]


def setup_commands(a, commit: str) -> list[list[str]]:
    """Put exactly ``commit`` (the run's, see pbbtpu_source) on every worker, then install."""
    d = shlex.quote(a.remote_dir)
    install = f"cd {d} && bash tpu/worker_setup.sh --python {shlex.quote(a.python)}"
    if a.from_local:
        archive = ROOT / "build" / f"pbbjax-src-{a.name}.tar.gz"
        scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(archive), f"{a.name}:{REMOTE_ARCHIVE}"]
        scp += [*_where(a), "--worker=all", *(["--internal-ip"] if a.internal_ip else []), "--quiet"]
        unpack = (
            f"set -euo pipefail; mkdir -p {d}; tar -xzf {REMOTE_ARCHIVE} -C {d}; rm -f {REMOTE_ARCHIVE}; "
        )
        pack = ["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={archive}", commit]
        return [pack, scp, ssh(a, unpack + install)]
    repo, ref, sha = shlex.quote(a.repo), shlex.quote(a.ref), shlex.quote(commit)
    has = shlex.quote(f"{commit}^{{commit}}")
    gone = shlex.quote(f"setup: commit {commit}, the one this run started with, is not in {a.repo}")
    by_ref = "" if a.ref == commit else f" || git -C {d} fetch --quiet {repo} {ref}"
    fetch = (  # by commit where the server allows it, else the ref (which may have moved on from it)
        f"set -euo pipefail; if [ ! -d {d}/.git ]; then git clone --quiet {repo} {d}; fi; "
        f"git -C {d} cat-file -e {has} 2>/dev/null || git -C {d} fetch --quiet {repo} {sha}{by_ref}; "
        f"git -C {d} checkout --quiet --force {sha} || {{ echo {gone} >&2; exit 3; }}; "
    )
    return [ssh(a, fetch + install)]


def train_args(a, acc: Accelerator, overrides: list[str]) -> list[str]:
    args = ["--config", a.config]
    if a.workdir:
        args.append(f"--config.workdir={a.workdir}")
    if acc.hosts > 1 and not any(o.startswith("--config.distributed=") for o in overrides):
        # Workers' login shells may lack the variables pbbjax's "auto" looks for; on Cloud TPU,
        # jax.distributed.initialize() finds the other workers from the VM metadata.
        args.append("--config.distributed=on")
    return args + overrides


def launch_command(a, acc: Accelerator, overrides: list[str], *, masked=False) -> list[str]:
    env = [f"{k}={'***' if masked and _secret(k) else v}" for k, v in a.env]
    start = ["start", *(["--workdir", a.workdir] if a.workdir else []), "--", *train_args(a, acc, overrides)]
    return ssh(a, worker_script(a, *start, env=env))


def _secret(name: str) -> bool:
    return bool(re.search(r"TOKEN|SECRET|PASSWORD|KEY", name, re.IGNORECASE))


# -- checks ----------------------------------------------------------------------------------------------


def check_common(a) -> None:
    a.project = a.project or os.environ.get("CLOUDSDK_CORE_PROJECT", "")
    a.zone = a.zone or os.environ.get("CLOUDSDK_COMPUTE_ZONE", "")
    if not a.project:
        raise UsageError("--project is required (or set CLOUDSDK_CORE_PROJECT)")
    if not a.zone:
        raise UsageError("--zone is required (or set CLOUDSDK_COMPUTE_ZONE), e.g. us-east5-a for v5p")
    if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", a.zone):
        raise UsageError(f"--zone: {a.zone!r} is not a zone (expected e.g. us-central2-b, not a region)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", a.name):
        raise UsageError(f"--name: {a.name!r} is not a TPU name (lowercase letters, digits and '-')")
    if not a.remote_dir or a.remote_dir.startswith("~"):
        raise UsageError("--remote-dir: a path relative to the worker's home (e.g. pbbjax) or absolute")


def check_workdir(a, acc: Accelerator, *, why_gcs: str | None) -> None:
    if a.workdir and a.workdir.startswith("gs://"):
        if not re.fullmatch(r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?", a.workdir):
            raise UsageError(f"--workdir: {a.workdir!r} is not a gs://BUCKET/PATH")
        return
    if acc.hosts > 1:
        why_gcs = f"{acc.type} has {acc.hosts} workers, which share no disk"
    if why_gcs:
        raise UsageError(f"--workdir must be a gs:// path: {why_gcs} (got {a.workdir or 'none'!r})")


def check_run(a, acc: Accelerator, overrides: list[str]) -> str | None:
    """Raise on a bad config or override; return a note when the preset is not sized for this slice."""
    for o in overrides:
        if not o.startswith("--config."):
            raise UsageError(f"override {o!r}: arguments after '--' are config overrides, --config.a.b=value")
        if o.startswith("--config.workdir"):
            raise UsageError("set the workdir with --workdir, not --config.workdir (the logs need it too)")
    path, _, preset = a.config.partition(":")
    if not (ROOT / path).is_file():
        configs = ", ".join(sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.py")))
        raise UsageError(f"--config: no file {path!r} in {ROOT} (configs: {configs})")
    model, _, pod = preset.partition(",")
    if pod:  # pbbjax sizes the batch layout (microbatches) for this pod: it must be the slice's size
        try:
            chips = parse_accelerator(pod).chips
        except UsageError:
            return None  # not a slice name: pbbjax itself says what it expected
        if chips != acc.chips:
            raise UsageError(
                f"--config: pod {pod!r} has {chips} chips, but {acc.type} has {acc.chips}: "
                f"use {path}:{model},{acc.pod_name}"
            )
    elif model not in ("", "cpu", "tiny"):
        return (
            f"{a.config} is sized for its model's default pod; {path}:{model},{acc.pod_name} sizes it for "
            f"this {acc.type}"
        )
    return None


def parse_env(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        name, eq, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(f"--env: {item!r} is not NAME=VALUE or NAME")
        if not eq:
            if name not in os.environ:
                raise UsageError(f"--env: {name} is not set here, so there is no value to pass on")
            value = os.environ[name]
        out.append((name, value))
    return out

#!/usr/bin/env python3
"""Create, set up, launch, watch and tear down pbbjax runs on Cloud TPU VMs and pod slices.

    python tpu/pbbtpu.py COMMAND [--name NAME] --zone ZONE --project PROJECT [options] [-- --config.a.b=v ...]

Commands: ``create``, ``setup``, ``launch``, ``up`` (create + setup + launch), ``watch`` (keep a run going
through preemptions and restarts), ``status``, ``logs``, ``stop``, ``teardown``. Every command takes
``--dry-run``: it prints each command it would run, one per line, shell-quoted (lines starting with ``#``
are notes), and runs nothing. Every command it runs has a time limit (``--timeout KIND=SECONDS``), and
every VM of a run gets the commit the run started with (pbbtpu_source.py). This file uses only the
standard library, so it runs wherever ``gcloud`` does, without pbbjax installed. What runs on the
workers is ``tpu/worker_setup.sh`` and ``tpu/worker_run.sh`` in the checkout that ``setup`` puts there;
``tpu/README.md`` is the walkthrough.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # pbbtpu_* beside this file, however it is run

from pbbtpu_lib import (  # noqa: E402
    LOST,
    READY,
    ROOT,
    RUN_STATES,
    STOPPED,
    WAITING,
    Accelerator,
    RestartBudget,
    UsageError,
    check_common,
    check_run,
    check_workdir,
    create_commands,
    delete_command,
    describe_command,
    launch_command,
    parse_accelerator,
    parse_env,
    parse_fakes,
    setup_commands,
    ssh,
    start_command,
    summarize_run,
    worker_script,
)
from pbbtpu_shell import TIMEOUTS, CallFailed, Failed, Shell, parse_timeouts  # noqa: E402
from pbbtpu_source import pin_commit  # noqa: E402

# -- commands ----------------------------------------------------------------------------------------------


def probe_tpu(a, sh: Shell, fakes: list[str] | None) -> str | None:
    """The TPU's (or queued resource's) state; in a dry run the next fake state, None when they run out."""
    cmd = describe_command(a)
    if sh.dry_run:
        sh.run(cmd, kind="describe")
        return fakes.pop(0) if fakes else None
    res = sh.run(cmd, kind="describe", capture=True, check=False)
    if res.returncode == 0:
        return (res.stdout.split() or ["UNKNOWN"])[0]
    if "NOT_FOUND" in res.stderr or "not found" in res.stderr.lower():
        return "NOT_FOUND"
    sys.stderr.write(res.stderr)
    return "UNKNOWN"


def probe_run(a, acc: Accelerator, sh: Shell, fakes: list[str] | None) -> str:
    """running | done | failed | absent | unknown, from worker_run.sh status on every worker."""
    cmd = ssh(a, worker_script(a, "status"))
    if sh.dry_run:
        sh.run(cmd, kind="ssh")
        return fakes.pop(0) if fakes else "running"
    try:
        res = sh.run(cmd, kind="ssh", capture=True, check=False)
    except CallFailed as e:  # name the workers that answered: the others are the ones to look at
        answered = [line.split()[1] for line in e.output.splitlines() if line.startswith("pbbjax-status ")]
        e.add(f"{len(answered)} of {acc.hosts} workers answered ({', '.join(answered) or 'none'})")
        raise
    for line in res.stdout.splitlines():
        if line.startswith("pbbjax-status "):
            sh.note(line)
    return summarize_run(res.stdout, acc.hosts)


def wait_ready(a, sh: Shell, fakes: list[str] | None) -> bool:
    while (state := probe_tpu(a, sh, fakes)) not in READY:
        if state is None:
            sh.note("fake states used up before the TPU was ready; the dry run stops here")
            return False
        if state in LOST | STOPPED:
            raise Failed(f"TPU {a.name} is {state} while waiting for it to be ready")
        sh.note(f"TPU {a.name}: {state}; waiting")
        sh.sleep(a.interval)
    return True


def install(a, sh: Shell, commit: str) -> None:
    if a.from_local and not sh.dry_run:
        (ROOT / "build").mkdir(exist_ok=True)
    kinds = ["git", "scp", "setup"] if a.from_local else ["setup"]
    for kind, cmd in zip(kinds, setup_commands(a, commit), strict=True):
        sh.run(cmd, kind=kind)


def create(a, sh: Shell, acc: Accelerator) -> None:
    for cmd in create_commands(a, acc):
        sh.run(cmd, kind="create")


def cmd_create(a, sh, overrides):
    acc = parse_accelerator(a.accelerator)
    sh.note(
        f"{acc.type}: {acc.chips} chips, {acc.hosts} worker(s), runtime {a.version or acc.generation.runtime}"
    )
    create(a, sh, acc)
    if a.wait:
        wait_ready(a, sh, a.fake_states)


def cmd_setup(a, sh, overrides):
    install(a, sh, pin_commit(a, sh))


def cmd_launch(a, sh, overrides):
    acc = parse_accelerator(a.accelerator)
    if a.preset_note:
        sh.note(a.preset_note)
    masked = launch_command(a, acc, overrides, masked=True)
    sh.run(launch_command(a, acc, overrides), kind="ssh", display=masked)
    sh.note(f"logs: python tpu/pbbtpu.py logs --name {a.name} --zone {a.zone} --project {a.project}")


def cmd_up(a, sh, overrides):
    commit = pin_commit(a, sh)  # first: a dirty checkout or an unknown --ref stops before any TPU exists
    acc = parse_accelerator(a.accelerator)
    sh.note(
        f"{acc.type}: {acc.chips} chips, {acc.hosts} worker(s), runtime {a.version or acc.generation.runtime}"
    )
    create(a, sh, acc)
    if wait_ready(a, sh, a.fake_states):
        install(a, sh, commit)
        cmd_launch(a, sh, overrides)


def cmd_watch(a, sh, overrides):
    """Keep the run going until it is done: recreate a lost TPU, set it up with the run's commit and
    relaunch (the run resumes from its newest checkpoint in the gs:// workdir); relaunch a failed run.
    Failures (a run that exits non-zero, a call that times out, a setup or launch that fails) spend a
    budget of --max-restarts per --restart-window hours; the TPU being lost, or the cloud refusing a
    create, start or delete (no capacity), spends nothing and is retried at every check."""
    acc = parse_accelerator(a.accelerator)
    commit = pin_commit(a, sh)
    budget = RestartBudget(a.max_restarts, a.restart_window * 3600)
    fresh = False  # a TPU this loop created, with nothing on it yet
    while True:
        try:
            if (state := probe_tpu(a, sh, a.fake_states)) is None:
                break
            sh.note(f"TPU {a.name}: {state}")
            if state in READY:
                run = "absent" if fresh else probe_run(a, acc, sh, a.fake_runs)
                sh.note("a new TPU: set up and launch" if fresh else f"run: {run}")
                if run == "done":
                    if a.teardown_when_done:
                        sh.run(delete_command(a), kind="delete")
                    return 0
                if run == "failed":
                    spend(a, sh, budget, "the run exited non-zero on a worker")
                    sh.note("relaunch, resume from the newest checkpoint")
                if run == "absent":
                    install(a, sh, commit)
                if run in ("absent", "failed"):
                    cmd_launch(a, sh, overrides)
                    fresh = False
            elif state in LOST:
                if state != "NOT_FOUND":
                    sh.run(delete_command(a), kind="delete")
                create(a, sh, acc)
                fresh = True
            elif state in STOPPED:
                sh.run(start_command(a), kind="start")
        except CallFailed as e:
            if e.timed_out or e.kind not in ("create", "delete", "start"):
                spend(a, sh, budget, str(e))
            else:  # no capacity, a quota: the cloud's answer may change, so this spends nothing
                sh.note(f"{e}; not counted as a failure")
            sh.note(f"trying again in {a.interval:g}s")
        sh.sleep(a.interval)
    sh.note("fake states used up; the dry run stops here")
    return 0


def spend(a, sh: Shell, budget: RestartBudget, what: str) -> None:
    """Count one failure; raise when there have been more than --max-restarts in --restart-window."""
    window = f"{a.restart_window:g}h"
    if not budget.spend(sh.now()):
        raise Failed(
            f"{len(budget.times)} failures within {window} (--max-restarts {a.max_restarts} per "
            f"--restart-window {window}), the last: {what}; TPU {a.name} kept for a look at the logs"
        )
    sh.note(f"failure {len(budget.times)} of at most {a.max_restarts} in {window}: {what}")


def cmd_status(a, sh, overrides):
    state = probe_tpu(a, sh, None)
    if not sh.dry_run:
        print(f"TPU {a.name}: {state}", flush=True)
    if sh.dry_run or state in READY:
        sh.run(ssh(a, worker_script(a, "status")), kind="ssh")


def cmd_logs(a, sh, overrides):
    if a.fetch:
        if not (a.workdir or "").startswith("gs://"):
            raise UsageError("logs --fetch DIR copies <workdir>/logs: pass the run's gs:// --workdir")
        logs = f"{a.workdir.rstrip('/')}/logs"
        sh.run(["gcloud", "storage", "rsync", "--recursive", logs, a.fetch], kind="storage")
        return
    if a.follow and a.worker == "all":
        raise UsageError("logs --follow follows one worker: add --worker 0 (or another index)")
    follow = ["--follow"] if a.follow else []
    cmd = ssh(a, worker_script(a, "logs", "--lines", str(a.lines), *follow), worker=a.worker)
    sh.run(cmd, kind=None if a.follow else "ssh")  # --follow runs until Ctrl-C


def cmd_stop(a, sh, overrides):
    sh.run(ssh(a, worker_script(a, "stop")), kind="ssh")


def cmd_teardown(a, sh, overrides):
    sh.run(delete_command(a), kind="delete")


COMMANDS = {
    "create": (cmd_create, "create a TPU VM or pod slice (directly, or as a queued resource with --queued)"),
    "setup": (cmd_setup, "install pbbjax with jax[tpu] on every worker (git checkout or --from-local)"),
    "launch": (cmd_launch, "start a config on every worker, in the background, one log per worker"),
    "up": (cmd_up, "create, wait until ready, setup, launch"),
    "watch": (
        cmd_watch,
        "keep a run going: recreate a preempted TPU, set up, relaunch (resumes), until done",
    ),
    "status": (cmd_status, "the TPU's state and each worker's run state"),
    "logs": (cmd_logs, "print the tail of each worker's log (--follow one), or --fetch them from gs://"),
    "stop": (cmd_stop, "stop the run on every worker (the TPU stays)"),
    "teardown": (cmd_teardown, "delete the TPU (and its queued resource with --queued)"),
}
# Which option groups each command takes.
GROUPS = {
    "create": ("tpu", "wait", "create"),
    "setup": ("source",),
    "launch": ("accelerator", "run"),
    "up": ("tpu", "source", "pin", "run", "wait"),
    "watch": ("tpu", "source", "pin", "run", "watch"),
    "status": ("queued",),
    "logs": ("logs",),
    "stop": (),
    "teardown": ("queued",),
}


def _add_group(p: argparse.ArgumentParser, group: str) -> None:
    if group in ("tpu", "accelerator"):
        p.add_argument("--accelerator", required=True, help="v4-8, v5litepod-8 (= v5e-8), v5p-32, v6e-8 ...")
    if group in ("tpu", "queued"):
        p.add_argument("--queued", action="store_true", help="a queued resource (named like the TPU)")
    if group == "tpu":
        p.add_argument("--version", default="", help="TPU software version (default: per generation)")
        p.add_argument(
            "--provisioning",
            default="on-demand",
            choices=("on-demand", "spot", "preemptible", "reserved"),
            help="spot: cheap, can be preempted (watch recreates it); preemptible: older VMs only",
        )
        p.add_argument("--create-arg", action="append", default=[], metavar="FLAG",
                       help="extra create flag, e.g. --create-arg=--network=my-net")  # fmt: skip
    if group == "source":
        p.add_argument("--repo", default="", help="git URL every worker can clone")
        p.add_argument(
            "--ref", default="main", help="branch, tag or full commit; looked up once per run (default main)"
        )
        p.add_argument(
            "--from-local", action="store_true", help="ship this checkout's HEAD (git archive) instead"
        )
        p.add_argument(
            "--allow-dirty", action="store_true", help="--from-local: ship HEAD without uncommitted changes"
        )
        p.add_argument("--python", default="3.11", help="Python version of the workers' venv (default 3.11)")
    if group == "pin":
        p.add_argument(
            "--repin", action="store_true",
            help="look --ref (or HEAD) up again and record it as the run's commit in its gs:// workdir",
        )  # fmt: skip
    if group == "run":
        p.add_argument("--config", required=True, help="configs/<curriculum>.py[:preset[,mesh]]")
        p.add_argument("--workdir", default="", help="gs://BUCKET/RUN (required on multi-host slices)")
        p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                       help="environment for the run (NAME alone passes this machine's value)")  # fmt: skip
    if group in ("wait", "watch"):
        p.add_argument(
            "--interval", type=float, default=30 if group == "wait" else 120, help="seconds between checks"
        )
        p.add_argument("--fake-states", help="dry run only: the TPU states to pretend, e.g. PREEMPTED,READY")
    if group == "create":
        p.add_argument("--wait", action="store_true", help="wait until the TPU is ready")
    if group == "watch":
        p.add_argument(
            "--fake-runs", help=f"dry run only: the run states to pretend ({', '.join(RUN_STATES)})"
        )
        p.add_argument(
            "--max-restarts", type=int, default=3,
            help="failures (run exits non-zero, call times out) allowed per --restart-window (default 3)",
        )  # fmt: skip
        p.add_argument(
            "--restart-window", type=float, default=24, metavar="HOURS",
            help="failures older than this many hours no longer count (default 24)",
        )  # fmt: skip
        p.add_argument(
            "--teardown-when-done", action="store_true", help="delete the TPU when the run is done"
        )
    if group == "logs":
        p.add_argument("--worker", default="all", help="all, or a worker index")
        p.add_argument("--lines", type=int, default=50)
        p.add_argument("--follow", action="store_true", help="keep printing (one worker)")
        p.add_argument("--fetch", metavar="DIR", help="copy every worker's log from <workdir>/logs to DIR")
        p.add_argument("--workdir", default="", help="the run's gs:// workdir (for --fetch)")


OVERRIDES_EPILOG = (
    "Config overrides go last, after '--': ... -- --config.train.steps=100 '--config.corpus=my set.jsonl'. "
    "They reach python -m pbbjax.train on every worker exactly as given."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pbbtpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        epilog = OVERRIDES_EPILOG if "run" in GROUPS[name] else None
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog)
        p.add_argument("--name", default="pbbjax", help="TPU name (default pbbjax)")
        p.add_argument("--zone", default="", help="e.g. us-east5-a (default: $CLOUDSDK_COMPUTE_ZONE)")
        p.add_argument("--project", default="", help="Google Cloud project (default: $CLOUDSDK_CORE_PROJECT)")
        p.add_argument("--remote-dir", default="pbbjax", help="the checkout on each worker, from its home")
        p.add_argument("--internal-ip", action="store_true", help="ssh/scp over the internal IP")
        p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
        p.add_argument(
            "--timeout", action="append", default=[], metavar="KIND=SECONDS",
            help="limit for one kind of call: " + ", ".join(f"{k}={v:g}" for k, v in TIMEOUTS.items()),
        )  # fmt: skip
        for group in GROUPS[name]:
            _add_group(p, group)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        argv, overrides = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    a = build_parser().parse_args(argv)
    try:
        check_common(a)
        if overrides and "run" not in GROUPS[a.command]:
            raise UsageError(f"{a.command} takes no config overrides after '--'")
        for flag in ("fake_states", "fake_runs"):
            if getattr(a, flag, None) and not a.dry_run:
                raise UsageError(f"--{flag.replace('_', '-')} only works with --dry-run")
        if hasattr(a, "fake_states"):
            a.fake_states = parse_fakes(a.fake_states, READY | LOST | STOPPED | WAITING, "--fake-states")
            if a.dry_run and a.fake_states is None:
                a.fake_states = ["READY"]
        if hasattr(a, "fake_runs"):
            a.fake_runs = parse_fakes(a.fake_runs, RUN_STATES, "--fake-runs")
        if getattr(a, "provisioning", "") == "preemptible" and a.queued:
            raise UsageError("--provisioning preemptible is for TPU VMs; queued resources take spot")
        if "source" in GROUPS[a.command] and not (a.repo or a.from_local):
            raise UsageError("--repo URL (a git URL every worker can clone) or --from-local is required")
        if "run" in GROUPS[a.command]:
            acc = parse_accelerator(a.accelerator)
            a.env = parse_env(a.env)
            a.preset_note = check_run(a, acc, overrides)
            gcs = "watch recreates lost TPUs, and their disks with them" if a.command == "watch" else None
            check_workdir(a, acc, why_gcs=gcs)
        if getattr(a, "max_restarts", 0) < 0 or getattr(a, "restart_window", 1) <= 0:
            raise UsageError("--max-restarts must be 0 or more and --restart-window more than 0 hours")
        shell = Shell(a.dry_run, parse_timeouts(a.timeout))
        if not a.dry_run and shutil.which("gcloud") is None:
            raise UsageError("gcloud is not installed here: see step 1 of tpu/README.md (or use --dry-run)")
        return COMMANDS[a.command][0](a, shell, overrides) or 0
    except UsageError as e:
        print(f"pbbtpu {a.command}: error: {e}", file=sys.stderr)
        return 2
    except Failed as e:
        print(f"pbbtpu {a.command}: {e}", file=sys.stderr)
        return getattr(e, "returncode", None) or 1


if __name__ == "__main__":
    sys.exit(main())

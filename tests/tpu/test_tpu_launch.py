"""tpu/pbbtpu.py's --dry-run output: the exact gcloud commands for a single-host v5e-8 and a v5p-32 pod,
quoting, the resume loop under fake TPU states, bad input, and gcloud's own parser accepting every
command. The worker scripts run for real in test_tpu_workers.py."""

import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from unittest import mock

import pytest
from tpu_helpers import (  # noqa: F401  (_no_gcloud_env: an autouse fixture)
    AT_V5E,
    AT_V5P,
    CREATE_POD,
    DESCRIBE_POD,
    LAUNCH_POD,
    NASTY,
    PIN_POD,
    POD_RUN,
    POD_WORKDIR,
    REPO,
    ROOT,
    SETUP_POD,
    SETUP_V5E,
    STATUS_POD,
    V5E,
    V5P,
    RecordingPopen,
    UsageError,
    _no_gcloud_env,
    dry,
    parse_accelerator,
    pbbtpu,
    remote_argv,
    summarize_run,
)  # fmt: skip

# -- slices ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, canonical, chips, hosts, runtime",
    [
        ("v4-8", "v4-8", 4, 1, "tpu-ubuntu2204-base"),
        ("v4-32", "v4-32", 16, 4, "tpu-ubuntu2204-base"),
        ("v5e-8", "v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
        ("v5litepod-16", "v5litepod-16", 16, 4, "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v5p-8", 4, 1, "v2-alpha-tpuv5"),
        ("V5P-32", "v5p-32", 16, 4, "v2-alpha-tpuv5"),
        ("v5p-64", "v5p-64", 32, 8, "v2-alpha-tpuv5"),
        ("v6e-8", "v6e-8", 8, 1, "v2-alpha-tpuv6e"),
        ("v6e-32", "v6e-32", 32, 8, "v2-alpha-tpuv6e"),
    ],
)
def test_accelerator_types(text, canonical, chips, hosts, runtime):
    acc = parse_accelerator(text)
    assert (acc.type, acc.chips, acc.hosts, acc.generation.runtime) == (canonical, chips, hosts, runtime)


@pytest.mark.parametrize("text", ["v3-8", "v5p-12", "v5e-12", "v6e-3", "tpu-8", "v5p", "v5p-0"])
def test_unknown_accelerator_types(text):
    with pytest.raises(UsageError, match="--accelerator"):
        parse_accelerator(text)


def test_run_state_from_every_worker():
    ok = "pbbjax-status w-0 exited 0\npbbjax-status w-1 exited 0\n"
    assert summarize_run(ok, hosts=2) == "done"
    assert summarize_run("pbbjax-status w-0 exited 0\n", hosts=2) == "absent"  # one worker not heard from
    assert summarize_run(ok.replace("w-1 exited 0", "w-1 running"), hosts=2) == "running"
    assert summarize_run(ok.replace("w-1 exited 0", "w-1 exited 137"), hosts=2) == "failed"
    assert summarize_run("pbbjax-status w-0 dead\npbbjax-status w-1 stopped\n", hosts=2) == "absent"
    assert summarize_run("ssh: connect to host 10.0.0.2 port 22: timed out\n", hosts=2) == "unknown"


# -- the exact commands ----------------------------------------------------------------------------------


def test_single_host_v5e_8_up(capsys):
    rc, commands, _, err = dry(
        capsys, "up", *V5E, "--accelerator", "v5e-8", *REPO, "--config", "configs/proactive.py:qwen3-0.6b"
    )
    assert rc == 0, err
    assert commands == [
        f"gcloud compute tpus tpu-vm create pbb-small {AT_V5E} --version=v2-alpha-tpuv5-lite "
        "--accelerator-type=v5litepod-8",
        f"gcloud compute tpus tpu-vm describe pbb-small {AT_V5E} '--format=value(state)'",
        SETUP_V5E,
        f"gcloud compute tpus tpu-vm ssh pbb-small {AT_V5E} --worker=all --quiet "
        "'--command=cd pbbjax && bash tpu/worker_run.sh start -- --config configs/proactive.py:qwen3-0.6b'",
    ]


def test_multi_host_v5p_32_launch_on_every_worker(capsys):
    rc, commands, _, err = dry(capsys, "launch", *V5P, "--accelerator", "v5p-32", *POD_RUN)
    assert rc == 0, err
    assert commands == [LAUNCH_POD]
    argv = remote_argv(commands[0])
    assert argv[:4] == ["cd", "pbbjax", "&&", "bash"]
    assert "--config.distributed=on" in argv  # jax.distributed.initialize() on every worker


def test_queued_spot_pod_create_and_teardown(capsys):
    rc, commands, notes, _ = dry(
        capsys, "create", *V5P, "--accelerator", "v5p-32", "--queued", "--provisioning", "spot"
    )
    assert rc == 0
    assert commands == [
        f"gcloud compute tpus queued-resources create pbb-pod --node-id=pbb-pod {AT_V5P} "
        "--runtime-version=v2-alpha-tpuv5 --accelerator-type=v5p-32 --spot"
    ]
    assert notes == ["# v5p-32: 16 chips, 4 worker(s), runtime v2-alpha-tpuv5"]
    assert dry(capsys, "teardown", *V5P, "--queued")[1] == [
        f"gcloud compute tpus queued-resources delete pbb-pod {AT_V5P} --force --quiet"
    ]
    assert dry(capsys, "teardown", *V5P)[1] == [f"gcloud compute tpus tpu-vm delete pbb-pod {AT_V5P} --quiet"]


def test_create_options(capsys):
    rc, commands, _, _ = dry(
        capsys, "create", *V5E, "--accelerator", "v4-8", "--provisioning", "preemptible",
        "--version", "tpu-ubuntu2204-base", "--create-arg=--network=my-net", "--wait",
        "--fake-states", "CREATING,READY",
    )  # fmt: skip
    assert rc == 0
    describe = f"gcloud compute tpus tpu-vm describe pbb-small {AT_V5E} '--format=value(state)'"
    assert commands == [
        f"gcloud compute tpus tpu-vm create pbb-small {AT_V5E} --version=tpu-ubuntu2204-base "
        "--accelerator-type=v4-8 --preemptible --network=my-net",
        describe,
        describe,
    ]


def test_setup_from_local_ships_head(capsys):
    rc, commands, notes, _ = dry(capsys, "setup", *V5P, "--from-local", "--python", "3.12")
    archive = ROOT / "build" / "pbbjax-src-pbb-pod.tar.gz"
    git = f"git -C {shlex.quote(str(ROOT))}"
    assert rc == 0
    assert commands[:4] == [
        f"{git} status --porcelain",  # uncommitted changes would not travel: an error (test_tpu_source.py)
        f"{git} rev-parse --verify 'HEAD^{{commit}}'",
        f"{git} archive --format=tar.gz {shlex.quote(f'--output={archive}')} '<commit of HEAD>'",
        f"gcloud compute tpus tpu-vm scp {shlex.quote(str(archive))} pbb-pod:pbbjax-src.tar.gz {AT_V5P} "
        "--worker=all --quiet",
    ]
    unpack = (
        "set -euo pipefail; mkdir -p pbbjax; tar -xzf pbbjax-src.tar.gz -C pbbjax; rm -f pbbjax-src.tar.gz;"
    )
    assert "# dry run: <commit of HEAD> stands for this checkout's HEAD, which must be clean" in notes
    assert remote_argv(commands[4]) == shlex.split(
        unpack + " cd pbbjax && bash tpu/worker_setup.sh --python 3.12"
    )


def test_status_logs_stop(capsys):
    assert dry(capsys, "status", *V5P)[1] == [DESCRIBE_POD, STATUS_POD]
    assert dry(capsys, "stop", *V5P)[1] == [STATUS_POD.replace("worker_run.sh status", "worker_run.sh stop")]
    assert dry(capsys, "logs", *V5P, "--worker", "2", "--lines", "100", "--follow")[1] == [
        f"gcloud compute tpus tpu-vm ssh pbb-pod {AT_V5P} --worker=2 --quiet "
        "'--command=cd pbbjax && bash tpu/worker_run.sh logs --lines 100 --follow'"
    ]
    assert dry(capsys, "logs", *V5P, "--fetch", "my logs", "--workdir", POD_WORKDIR + "/")[1] == [
        f"gcloud storage rsync --recursive {POD_WORKDIR}/logs 'my logs'"
    ]


def test_dry_run_is_deterministic_and_the_script_prints_the_same(capsys):
    argv = ["watch", *V5P, "--accelerator", "v5p-32", *REPO, *POD_RUN, "--fake-states", "PREEMPTED,READY"]
    first = dry(capsys, *argv)
    assert first == dry(capsys, *argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
    script = subprocess.run(
        [sys.executable, str(ROOT / "tpu" / "pbbtpu.py"), argv[0], "--dry-run", *argv[1:]],
        capture_output=True, text=True, env=env, cwd="/", check=True,
    )  # fmt: skip
    lines = script.stdout.splitlines()
    assert [x for x in lines if not x.startswith("#")] == first[1]
    assert [x for x in lines if x.startswith("#")] == first[2]


# -- quoting ---------------------------------------------------------------------------------------------


def test_overrides_survive_both_shells(capsys):
    rc, commands, _, err = dry(
        capsys, "launch", *V5P, "--accelerator", "v5p-32", *POD_RUN, "--",
        "--config.train.steps=10", NASTY,
    )  # fmt: skip
    assert rc == 0, err
    argv = remote_argv(commands[0])
    assert argv[-2:] == ["--config.train.steps=10", NASTY]


def test_secrets_are_masked_in_the_dry_run_only(capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret123")
    argv = ["launch", *V5P, "--accelerator", "v5p-32", *POD_RUN, "--env", "HF_TOKEN", "--env", "A=b"]
    rc, commands, _, _ = dry(capsys, *argv)
    assert rc == 0 and "hf_secret123" not in commands[0]
    assert remote_argv(commands[0])[3:6] == ["env", "HF_TOKEN=***", "A=b"]
    RecordingPopen.calls = []
    popen = mock.patch.object(subprocess, "Popen", RecordingPopen)
    with popen, mock.patch.object(shutil, "which", return_value="/usr/bin/gcloud"):
        assert pbbtpu.main(argv) == 0
    assert remote_argv(shlex.join(RecordingPopen.calls[0]))[3:6] == ["env", "HF_TOKEN=hf_secret123", "A=b"]


# -- the resume loop -------------------------------------------------------------------------------------


def test_watch_recreates_a_preempted_pod_then_sets_up_and_relaunches(capsys):
    rc, commands, notes, err = dry(
        capsys, "watch", *V5P, "--accelerator", "v5p-32", "--provisioning", "spot", *REPO, *POD_RUN,
        "--fake-states", "PREEMPTED,CREATING,READY",
    )  # fmt: skip
    assert rc == 0, err
    assert commands == [
        *PIN_POD,
        DESCRIBE_POD,
        f"gcloud compute tpus tpu-vm delete pbb-pod {AT_V5P} --quiet",
        f"{CREATE_POD} --spot",
        DESCRIBE_POD,
        DESCRIBE_POD,
        SETUP_POD,  # a fresh VM: install, then launch; pbbjax resumes from the newest checkpoint in gs://
        LAUNCH_POD,
        DESCRIBE_POD,  # no fake states left: the dry run ends
    ]
    assert "# TPU pbb-pod: PREEMPTED" in notes and notes.count("# sleep 120s") == 3


def test_watch_queued_resource_through_its_states(capsys):
    rc, commands, _, err = dry(
        capsys, "watch", *V5P, "--accelerator", "v5p-32", "--queued", "--provisioning", "spot", *REPO,
        *POD_RUN, "--fake-states", "WAITING_FOR_RESOURCES,ACTIVE,SUSPENDED,PROVISIONING,ACTIVE",
        "--fake-runs", "running", "--interval", "60",
    )  # fmt: skip
    assert rc == 0, err
    describe = f"gcloud compute tpus queued-resources describe pbb-pod {AT_V5P} '--format=value(state.state)'"
    assert commands == [
        *PIN_POD,
        describe,
        describe,
        STATUS_POD,
        describe,
        f"gcloud compute tpus queued-resources delete pbb-pod {AT_V5P} --force --quiet",
        f"gcloud compute tpus queued-resources create pbb-pod --node-id=pbb-pod {AT_V5P} "
        "--runtime-version=v2-alpha-tpuv5 --accelerator-type=v5p-32 --spot",
        describe,
        describe,
        SETUP_POD,
        LAUNCH_POD,
        describe,
    ]


def test_watch_relaunches_a_failed_run_and_tears_down_when_done(capsys):
    rc, commands, notes, _ = dry(
        capsys, "watch", *V5P, "--accelerator", "v5p-32", *REPO, *POD_RUN, "--teardown-when-done",
        "--fake-states", "READY,READY,READY,READY", "--fake-runs", "running,failed,absent,done",
    )  # fmt: skip
    assert rc == 0
    assert commands == [
        *PIN_POD,
        DESCRIBE_POD, STATUS_POD,
        DESCRIBE_POD, STATUS_POD, LAUNCH_POD,  # failed: relaunch (resumes), no reinstall
        DESCRIBE_POD, STATUS_POD, SETUP_POD, LAUNCH_POD,  # gone (the VM restarted): setup is idempotent
        DESCRIBE_POD, STATUS_POD, f"gcloud compute tpus tpu-vm delete pbb-pod {AT_V5P} --quiet",
    ]  # fmt: skip
    assert "# failure 1 of at most 3 in 24h: the run exited non-zero on a worker" in notes
    assert "# relaunch, resume from the newest checkpoint" in notes


def test_watch_gives_up_after_max_restarts(capsys):
    rc, commands, _, err = dry(
        capsys, "watch", *V5P, "--accelerator", "v5p-32", *REPO, *POD_RUN, "--max-restarts", "1",
        "--fake-states", "READY,READY,READY", "--fake-runs", "failed,failed",
    )  # fmt: skip
    assert rc == 1
    assert err == (
        "pbbtpu watch: 2 failures within 24h (--max-restarts 1 per --restart-window 24h), the last: the run "
        "exited non-zero on a worker; TPU pbb-pod kept for a look at the logs\n"
    )
    assert commands == [*PIN_POD, DESCRIBE_POD, STATUS_POD, LAUNCH_POD, DESCRIBE_POD, STATUS_POD]


def test_watch_starts_a_stopped_vm_and_creates_a_missing_one(capsys):
    rc, commands, _, _ = dry(
        capsys,
        "watch",
        *V5P,
        "--accelerator",
        "v5p-32",
        *REPO,
        *POD_RUN,
        "--fake-states",
        "NOT_FOUND,STOPPED",
    )
    assert rc == 0
    assert commands == [
        *PIN_POD,
        DESCRIBE_POD,
        CREATE_POD,
        DESCRIBE_POD,
        f"gcloud compute tpus tpu-vm start pbb-pod {AT_V5P}",
        DESCRIBE_POD,
    ]


# -- bad input -------------------------------------------------------------------------------------------

LAUNCH_POD_ARGS = ["launch", *V5P, "--accelerator", "v5p-32"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["create", *V5P, "--accelerator", "v3-8"], "unknown accelerator type 'v3-8'"),
        (["create", *V5P, "--accelerator", "v5p-12"], "'v5p-12' is not a v5p slice"),
        (["create", "--zone", "us-east5-a", "--accelerator", "v5p-8"], "--project is required"),
        (["create", "--project", "p", "--accelerator", "v5p-8"], "--zone is required"),
        (["create", "--project", "p", "--zone", "us-east5", "--accelerator", "v5p-8"], "not a zone"),
        (["create", *V5P[2:], "--name", "My_TPU", "--accelerator", "v5p-8"], "is not a TPU name"),
        (
            ["create", *V5P, "--accelerator", "v5p-8", "--queued", "--provisioning", "preemptible"],
            "take spot",
        ),
        (
            [*LAUNCH_POD_ARGS, "--config", "configs/proactive.py:qwen3-14b"],
            "v5p-32 has 4 workers, which share",
        ),
        (
            [*LAUNCH_POD_ARGS, "--config", "configs/proactive.py:qwen3-14b", "--workdir", "runs/q"],
            "--workdir must be a gs:// path",
        ),
        ([*LAUNCH_POD_ARGS, *POD_RUN[:2], "--workdir", "gs://b/run"], "is not a gs://BUCKET/PATH"),
        (
            ["watch", *V5E, "--accelerator", "v5e-8", *REPO, "--config", "configs/proactive.py"],
            "watch recreates lost TPUs",
        ),
        (
            [*LAUNCH_POD_ARGS, "--config", "configs/nope.py", "--workdir", POD_WORKDIR],
            "no file 'configs/nope.py'",
        ),
        (
            [*LAUNCH_POD_ARGS, "--config", "configs/proactive.py:qwen3-4b,v5p-8", "--workdir", POD_WORKDIR],
            "pod 'v5p-8' has 4 chips, but v5p-32 has 16: use configs/proactive.py:qwen3-4b,v5p-32",
        ),
        (
            [
                "launch",
                *V5P,
                "--accelerator",
                "v5litepod-16",
                "--config",
                "configs/proactive.py:qwen3-4b,v5p-8",
                "--workdir",
                POD_WORKDIR,
            ],
            "but v5litepod-16 has 16: use configs/proactive.py:qwen3-4b,v5e-16",
        ),  # fmt: skip
        ([*LAUNCH_POD_ARGS, *POD_RUN, "--", "train.steps=10"], "are config overrides"),
        ([*LAUNCH_POD_ARGS, *POD_RUN, "--", "--config.workdir=gs://x-y/z"], "with --workdir"),
        ([*LAUNCH_POD_ARGS, *POD_RUN, "--env", "NOT_SET_ANYWHERE"], "NOT_SET_ANYWHERE is not set here"),
        ([*LAUNCH_POD_ARGS, *POD_RUN, "--env", "9X=1"], "is not NAME=VALUE"),
        (["setup", *V5P], "--repo URL"),
        (["stop", *V5P, "--", "--config.seed=1"], "takes no config overrides"),
        (["logs", *V5P, "--follow"], "--worker 0"),
        (["logs", *V5P, "--fetch", "out"], "gs:// --workdir"),
        (["watch", *V5P, "--accelerator", "v5p-32", *REPO, *POD_RUN, "--fake-states", "READY"], "--dry-run"),
    ],
)
def test_bad_input_is_a_clear_error(capsys, argv, message):
    calls = []
    with mock.patch.object(subprocess, "run", side_effect=lambda *a, **k: calls.append(a)):
        rc = pbbtpu.main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.startswith(f"pbbtpu {argv[0]}: error: ") and not calls  # nothing ran


def test_a_preset_without_pod_gets_a_note(capsys):
    rc, _, notes, _ = dry(
        capsys, "launch", *V5P, "--accelerator", "v5p-32", "--config", "configs/proactive.py:qwen3-4b",
        "--workdir", POD_WORKDIR,
    )  # fmt: skip
    assert rc == 0
    assert notes[0] == (
        "# configs/proactive.py:qwen3-4b is sized for its model's default pod; "
        "configs/proactive.py:qwen3-4b,v5p-32 sizes it for this v5p-32"
    )


def test_without_gcloud_only_the_dry_run_works(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert pbbtpu.main(["teardown", *V5P]) == 2
    assert "gcloud is not installed here" in capsys.readouterr().err
    assert pbbtpu.main(["teardown", *V5P, "--dry-run"]) == 0


def test_bad_fake_state_is_named(capsys):
    rc, _, _, err = dry(
        capsys, "watch", *V5P, "--accelerator", "v5p-32", *REPO, *POD_RUN, "--fake-states", "PREMPTED"
    )
    assert rc == 2 and "--fake-states: unknown state(s) PREMPTED" in err


def test_project_and_zone_from_gcloud_environment(capsys, monkeypatch):
    monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "env-proj")
    monkeypatch.setenv("CLOUDSDK_COMPUTE_ZONE", "europe-west4-a")
    rc, commands, _, _ = dry(capsys, "teardown")
    assert rc == 0
    assert commands == [
        "gcloud compute tpus tpu-vm delete pbbjax --zone=europe-west4-a --project=env-proj --quiet"
    ]


# -- gcloud's own parser ---------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="gcloud is not installed")
def test_gcloud_accepts_every_command(capsys, tmp_path):
    """Each distinct gcloud command of the dry runs, given to the real gcloud with an empty config: it must
    get past argument parsing (exit 2, 'unrecognized arguments') and stop only for want of an account."""
    lines = set()
    for argv in (
        ["up", *V5P, "--accelerator", "v5p-32", "--queued", "--provisioning", "spot", "--from-local",
         *POD_RUN],
        ["watch", *V5P, "--accelerator", "v5p-32", "--provisioning", "spot", *REPO, *POD_RUN,
         "--fake-states", "PREEMPTED,STOPPED,READY", "--fake-runs", "failed"],
        ["teardown", *V5P, "--queued"],
        ["logs", *V5P, "--fetch", "out", "--workdir", POD_WORKDIR],
        ["logs", *V5P, "--worker", "1", "--follow"],
    ):  # fmt: skip
        lines.update(x for x in dry(capsys, *argv)[1] if x.startswith("gcloud "))
    lines.add(f"gcloud storage cp --quiet logs/worker-h.log {POD_WORKDIR}/logs/")  # what worker_run.sh runs
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
    env.update(
        HOME=str(tmp_path), CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), CLOUDSDK_CORE_DISABLE_PROMPTS="1"
    )

    def parse(line):
        return line, subprocess.run(shlex.split(line), env=env, capture_output=True, text=True, timeout=120)

    shapes = {}  # one command per gcloud verb and set of flag names: the values do not change the parse
    for line in sorted(lines):
        tokens = shlex.split(line)
        verb = tokens[:5] if tokens[1] == "compute" else tokens[:3]  # gcloud compute tpus tpu-vm ssh
        shapes.setdefault((*verb, *sorted(t.split("=")[0] for t in tokens if t.startswith("-"))), line)
    with ThreadPoolExecutor(2) as pool:
        for line, res in pool.map(parse, sorted(shapes.values())):
            assert res.returncode == 1 and "active account" in res.stderr, (line, res.stderr)
    assert len(shapes) >= 11

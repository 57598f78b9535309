"""The sandbox isolates every failure a program can have, never hangs, and holds against hostile programs.

Each hostile case must be blocked (the listener hears nothing, the file is not written or read, the caller
gets no signal, the machine keeps its memory) and reported as an error of that call, never as a crash of
the caller. A case that gets through is a failing test here, never a weaker default.
"""

import ast
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pbbjax.data.tasks import sandbox
from pbbjax.data.tasks.sandbox import SandboxSetupError, run_calls

SOURCE = """
import os
def f(x):
    print("noise on stdout must not corrupt the protocol")
    if x == 1:
        while True:
            pass
    if x == 2:
        raise ValueError("bad input")
    if x == 3:
        os._exit(3)
    if x == 4:
        return {1, 2}
    if x == 5:
        import socket
        socket.create_connection(("127.0.0.1", 9))
    if x == 6:
        return bytearray(8 * 1024**3)
    return [x, x * 2]
"""


def test_each_failure_is_isolated_and_later_calls_still_run():
    start = time.perf_counter()
    results = run_calls(
        SOURCE, "f", [[0], [1], [2], [3], [4], [5], [6], [7]], timeout_s=0.5, memory_bytes=1024**3
    )
    assert time.perf_counter() - start < 20
    assert [r.value for r in results if r.ok] == [[0, 0], [7, 14]]
    errors = [r.error for r in results]
    assert errors[1] == "timeout"
    assert errors[2] == "ValueError: bad input"
    assert errors[3] == "process died: exit code 3"
    assert "not JSON serializable" in errors[4]
    assert errors[5].startswith("PermissionError")
    assert errors[6].startswith("MemoryError")


def test_a_program_that_fails_to_load_is_a_clear_error():
    with pytest.raises(SandboxSetupError, match="entry point 'g'.*KeyError"):
        run_calls("def f(x):\n    return x\n", "g", [[1]])
    with pytest.raises(SandboxSetupError, match="SyntaxError"):
        run_calls("def f(x) return x", "f", [[1]])
    with pytest.raises(SandboxSetupError, match="timeout while loading"):
        run_calls("while True:\n    pass\n", "f", [[1]], timeout_s=0.3)


def _one(body: str, *args, timeout_s: float = 0.5, **limits):
    """Run ``def f(...)`` with ``body`` once; the call's result, and how long it took."""
    params = ", ".join(f"a{i}" for i in range(len(args)))
    source = f"def f({params}):\n" + "".join(f"    {line}\n" for line in body.strip("\n").split("\n"))
    start = time.perf_counter()
    (result,) = run_calls(source, "f", [list(args)], timeout_s=timeout_s, **limits)
    assert time.perf_counter() - start < 15
    return result


def _libc(call: str, *args):
    """``libc.<call>`` through ctypes, bypassing Python's checks: an error where it returns < 0."""
    body = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    return _one(body + f"if libc.{call} < 0:\n    raise OSError(ctypes.get_errno(), 'refused')", *args)


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1; ``heard()`` says whether anything connected."""
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)

    def heard() -> bool:
        try:
            server.accept()[0].close()
            return True
        except BlockingIOError:
            return False

    yield server.getsockname()[1], heard
    server.close()


CONNECT = "s = {m}.socket({m}.AF_INET, {m}.SOCK_STREAM); s.connect(('127.0.0.1', a0)); s.send(b'x')"


@pytest.mark.parametrize(
    "body",
    [
        "import socket\nsocket.create_connection(('127.0.0.1', a0)).send(b'x')",
        "import socket\n" + CONNECT.format(m="socket"),
        "import _socket\n" + CONNECT.format(m="_socket"),
        "import subprocess, sys\n"
        "c = \"import socket; socket.create_connection(('127.0.0.1', %d)).send(b'x')\" % a0\n"
        "subprocess.run([sys.executable, '-c', c], check=True)",
        "import subprocess\nsubprocess.run(['curl', '-s', f'http://127.0.0.1:{a0}/'], check=True)",
        # libc's socket and connect through ctypes, bypassing Python's socket module
        "import ctypes, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n"
        "address = struct.pack('<HH4s8x', 2, ((a0 & 255) << 8) | (a0 >> 8), bytes([127, 0, 0, 1]))\n"
        "if fd < 0 or libc.connect(fd, address, 16) != 0:\n"
        "    raise OSError(ctypes.get_errno(), 'libc connect failed')",
    ],
    ids=["socket", "socket-raw", "_socket", "subprocess-python", "subprocess-curl", "ctypes-libc"],
)
def test_no_connection_to_a_localhost_listener(listener, body):
    port, heard = listener
    result = _one(body, port)
    assert not result.ok, result
    assert not heard()


def test_no_connection_to_a_unix_socket_in_the_filesystem(tmp_path):
    # A network namespace does not separate pathname Unix sockets, and Landlock does not guard connecting
    # to one: the seccomp filter refuses to create the socket.
    path = str(tmp_path / "sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    server.setblocking(False)
    result = _one("import _socket\ns = _socket.socket(_socket.AF_UNIX)\ns.connect(a0)", path)
    assert not result.ok and "Operation not permitted" in result.error
    with pytest.raises(BlockingIOError):
        server.accept()
    server.close()


def test_no_writing_to_home_or_workdir(tmp_path):
    home_file = Path.home() / f"pbbjax-sandbox-probe-{uuid.uuid4().hex}"
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    for target in (home_file, workdir / "checkpoint"):
        result = _one("open(a0, 'w').write('overwritten')", str(target))
        escaped = target.exists()
        target.unlink(missing_ok=True)
        assert not escaped and not result.ok and "Permission denied" in result.error


def test_no_reading_credentials(tmp_path, monkeypatch):
    home = tmp_path / "home"
    credentials = home / ".config" / "gcloud" / "application_default_credentials.json"
    credentials.parent.mkdir(parents=True)
    credentials.write_text('{"refresh_token": "secret"}')
    monkeypatch.setenv("HOME", str(home))
    result = _one("return open(a0).read()", str(credentials))
    assert not result.ok and "Permission denied" in result.error
    result = _one("import os\nreturn os.listdir(a0)", str(credentials.parent))
    assert not result.ok and "Permission denied" in result.error
    # libc's open through ctypes meets the same refusal
    result = _libc("open(a0.encode(), 0)", str(credentials))
    assert not result.ok and "Errno 13" in result.error
    result = _one("import os\nreturn open(f'/proc/{os.getppid()}/environ').read()")  # the parent's secrets
    assert not result.ok


def test_a_fresh_private_temporary_directory_that_is_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    body = "import os\nbefore = os.listdir()\nopen('scratch', 'w').write('x')\nreturn [os.getcwd(), before]"
    first, second = _one(body), _one(body)
    assert first.ok and second.ok and first.value[1] == second.value[1] == []
    assert not any(tmp_path.iterdir())  # each run's directory is gone
    assert not Path(first.value[0]).exists()
    result = _one("with open('big', 'w') as f:\n    f.write('x' * 10**5)", disk_bytes=10**4)  # and each file
    assert not result.ok and "File too large" in result.error


def _leftovers(directory: Path) -> list[str]:
    """Processes still running from sandboxes whose temporary directories are in ``directory``."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if str(directory) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(proc.name)
        except OSError:
            pass
    return found


def test_no_new_processes_threads_bounded_and_nothing_survives(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = _one("import os\nwhile True:\n    os.fork()")  # a fork bomb
    assert not result.ok and "Operation not permitted" in result.error
    body = "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()"
    result = _one(body)  # each thread reserves its stack: the memory limit stops them
    assert not result.ok and "can't start new thread" in result.error
    result = _one("import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()\nreturn 1")
    assert result.ok
    assert _leftovers(tmp_path) == []


def test_memory_cpu_and_output_are_bounded():
    result = _one("x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_bytes=512 * 1024**2)
    assert not result.ok and result.error.startswith("MemoryError")
    start = time.perf_counter()
    result = _one("return sum(range(10**12))", timeout_s=0.3)  # a loop in C: no Python-level timeout
    # the CPU-time limit stops it, or on a loaded machine (less CPU time per second) the wall-clock kill
    stopped = ("process died: killed by SIGPROF (CPU time limit)", "process died: killed by SIGKILL")
    assert result.error in stopped
    assert time.perf_counter() - start < 5
    result = _one("for _ in range(1000):\n    print('x' * 10**6)")  # 1 GB of printing
    assert not result.ok and "printed more than" in result.error


def test_no_signal_reaches_the_caller():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        # by the caller's real pid, and by the parent the program sees
        by_pid = _one("import os, signal\nos.kill(a0, signal.SIGUSR1)", os.getpid())
        by_ppid = _one("import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)\nreturn os.getppid()")
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == []
    assert not by_pid.ok and "No such process" in by_pid.error
    # refused where Landlock scopes signals (Linux 6.12); elsewhere it reaches only the namespace's init
    assert not by_ppid.ok or by_ppid.value != os.getpid()


def test_no_reach_into_other_processes_ipc_or_keyrings():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    key = int.from_bytes(os.urandom(3), "little") + 1
    shmid = libc.shmget(key, 4096, 0o1600)  # IPC_CREAT | 0600: a System V segment of the caller's
    assert shmid >= 0
    try:
        assert not _libc("shmget(a0, 0, 0)", key).ok
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
    assert not _libc("ptrace(16, 1, 0, 0)").ok  # PTRACE_ATTACH to the namespace's init, outside Landlock
    keyctl = 250 if os.uname().machine == "x86_64" else 219
    assert not _libc("syscall(a0, 0, -3, 0)", keyctl).ok  # keyctl(KEYCTL_GET_KEYRING_ID, session keyring)


def test_a_program_cannot_forge_a_refusal():
    # a refusal stops every later run of the process; the program may write to every descriptor it holds
    body = "import os\nfor fd in range(64):\n    try:\n        os.write(fd, b'forged refusal')\n"
    _one(body + "    except OSError:\n        pass")
    assert _one("return 2").value == 2


def test_a_refused_mechanism_stops_every_run_until_weak_mode_is_chosen():
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare to take user namespaces away")
    check = (
        "from pbbjax.data.tasks import sandbox\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        sandbox.run_calls('def f():\\n    return 1\\n', 'f', [[]])\n"
        "    except sandbox.SandboxUnavailable as e:\n"
        "        print('refused:', e)\n"
        "sandbox.set_mode('weak')\n"
        "print('weak:', sandbox.run_calls('def f():\\n    return 1\\n', 'f', [[]])[0].value)\n"
    )
    # a user namespace in which no further user namespace may be created (the host's limit is untouched)
    script = f'echo 0 > /proc/sys/user/max_user_namespaces && exec {sys.executable} -c "$0"'
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c", script, check],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == lines[1], lines  # the first refusal is remembered
    assert "user, network, mount, PID and IPC namespaces" in lines[0] and "--config.sandbox=weak" in lines[0]
    assert lines[2] == "weak: 1"


def test_the_sandbox_mode_is_a_config_field(tmp_path):
    root = Path(__file__).parents[2]
    command = [sys.executable, "-m", "pbbjax.data", "--config", str(root / "configs" / "proactive.py")]
    done = subprocess.run(
        [*command, "--config.sandbox=none", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode != 0 and "config field 'sandbox' is 'none'" in done.stderr
    try:
        from pbbjax.config.run_config import build_run_config, domain_of
        from pbbjax.config.schema import base_config

        config = base_config("proactive")
        config.sandbox = "weak"
        domain_of(build_run_config(config))
        assert sandbox.current_mode() == "weak"
    finally:
        sandbox.set_mode("strict")


# Every way to run code in the package, where it may be used, and why that is not code from data.
ALLOWED = {
    ("pbbjax/data/tasks/sandbox.py", "subprocess"): "starts the sandbox's child",
    ("pbbjax/data/tasks/sandbox_child.py", "exec"): "runs the program, inside the sandbox",
    ("pbbjax/data/tasks/sandbox_child.py", "compile"): "compiles the program, inside the sandbox",
    ("pbbjax/data/tasks/sandbox_child.py", "ctypes"): "the kernel calls that build the sandbox",
    ("pbbjax/studies/runner.py", "exec_module"): "loads configs/*.py, code the user names on the command",
    ("pbbjax/export.py", "ctypes"): "calls libc's mallopt, a fixed function with fixed arguments",
    ("pbbjax/local_pod.py", "subprocess"): "starts the user's own command as the hosts of a simulated pod",
}
RUNS_CODE = {"exec", "eval", "compile", "__import__", "breakpoint", "exec_module", "system", "popen"}
RUNS_CODE_PREFIXES = ("exec", "spawn", "posix_spawn")  # os.execv, os.spawnl, ...
MODULES = {"subprocess", "multiprocessing", "runpy", "code", "pty", "pickle", "marshal", "shelve", "ctypes"}


def _uses(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            yield from (n.split(".")[0] for n in names if n.split(".")[0] in MODULES)
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            is_os = isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id == "os"
            if (name in RUNS_CODE and (isinstance(fn, ast.Name) or name == "exec_module" or is_os)) or (
                is_os and name.startswith(RUNS_CODE_PREFIXES)
            ):
                yield name
            if any(k.arg == "trust_remote_code" for k in node.keywords):
                yield "trust_remote_code"


def test_code_from_data_runs_only_in_the_sandbox():
    root = Path(__file__).parents[2]
    found = set()
    for path in sorted((root / "pbbjax").rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        found |= {(relative, use) for use in _uses(ast.parse(path.read_text(), relative))}
    assert found - set(ALLOWED) == set(), "code may run outside the sandbox (tasks/sandbox.py)"
    assert set(ALLOWED) - found == set(), "an allowance nothing uses any more: remove it"
    assert ("x", "exec") in {("x", u) for u in _uses(ast.parse("import os\nexec(s)\nos.system(c)"))}

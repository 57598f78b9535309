"""The sandbox's child process: isolates itself, then runs one program's calls (see ``sandbox.py``).

``sandbox.py`` runs this file as a script, ``python -I -B sandbox_child.py DIR``, with no pipes (stdin,
stdout and stderr are /dev/null). It reads ``DIR/job.json``, opens ``DIR/results`` and ``DIR/refused`` for
appending, and only then, before the program's text is compiled, applies every mechanism; a mechanism
the kernel refuses is written to ``DIR/refused`` and nothing runs. In strict mode:

1. This process enters new user, network, mount, PID and IPC namespaces (mapping only its own uid and gid) and
   mounts a tmpfs of ``disk_bytes`` on ``DIR/work``, visible only inside: the one writable place, gone
   when the namespace ends.
2. It forks the PID namespace's init, which forks the process that runs the program and waits for it.
   When the init exits, the kernel kills whatever else is left in the namespace.
3. That process sets resource limits, no_new_privs, a Landlock ruleset (read: the Python installation
   and the system's libraries; read and write: ``DIR/work``; execve: nowhere; when the kernel has them,
   no TCP and no signals or abstract sockets beyond the sandbox), a seccomp filter, and drops its
   capabilities. The filter refuses to create sockets (pathname Unix sockets are reachable through a
   network namespace and Landlock does not guard connecting to them) and processes (RLIMIT_NPROC does
   not bind uid 0, which many of our machines run as; threads stay allowed), and the kernel keyrings.

In weak mode only step 3's resource limits apply, and ``socket`` is replaced in Python: today's best
effort, for kernels that refuse the above.
"""

import ctypes
import io
import json
import os
import resource
import signal
import sys

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long
LIBC.unshare.argtypes = [ctypes.c_int]
LIBC.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
LIBC.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
LIBC.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x8000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446  # every architecture
READ_FILE, READ_DIR = 1 << 2, 1 << 3
MAX_TASKS = 16  # threads (RLIMIT_NPROC; it does not bind uid 0) beside seccomp's ban on new processes
OUTPUT_CHARS = 1 << 20  # what the program may print, in all (printed text is discarded)
# For the seccomp filter: the audit architecture; the system calls it refuses (socket, socketpair,
# io_uring_setup: io_uring makes and connects sockets without them; add_key, request_key, keyctl: the
# kernel keyrings are not namespaced; fork, vfork); clone; clone3
SYSCALLS = {
    "x86_64": (0xC000003E, (41, 53, 425, 248, 249, 250, 57, 58), 56, 435),
    "aarch64": (0xC00000B7, (198, 199, 425, 217, 218, 219), 220, 435),
}


class Refused(Exception):
    """The kernel refused a mechanism; the message names it."""


def _check(result: int, what: str) -> int:
    if result < 0:
        raise Refused(f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


def enter_namespaces(work: str, disk_bytes: int) -> None:
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC
    _check(LIBC.unshare(flags), "user, network, mount, PID and IPC namespaces (unshare)")
    try:
        for name, text in (
            ("uid_map", f"{uid} {uid} 1"),
            ("setgroups", "deny"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as e:
        raise Refused(f"mapping the user namespace's uid and gid: {e}") from e
    options = f"size={disk_bytes},mode=0700".encode()
    _check(
        LIBC.mount(b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options),
        "a tmpfs in the mount namespace (mount)",
    )


def wait_and_exit(pid: int) -> None:
    """Wait for ``pid`` and exit as it did (128 + N for signal N, as a shell reports it)."""
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(code if code >= 0 else 128 - code)


def set_limits(job: dict) -> None:
    cpu_s = int(2 * job["timeout_s"] * (len(job["calls"]) + 1)) + 1
    for limit, value in (
        (resource.RLIMIT_AS, job["memory_bytes"]),
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_FSIZE, job["disk_bytes"]),
        (resource.RLIMIT_CPU, cpu_s),
        (resource.RLIMIT_NPROC, MAX_TASKS),
    ):
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # never above the host's
        resource.setrlimit(limit, (value, value))


def _syscall(number: int, *args) -> int:
    return LIBC.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def landlock(work: str) -> None:
    abi = _check(_syscall(LANDLOCK_CREATE_RULESET, None, 0, 1), "Landlock (Linux >= 5.13)")
    fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1  # every filesystem right of this ABI
    # handled_access_fs, handled_access_net (TCP bind, connect: ABI 4), scoped (signals, sockets: ABI 6)
    attr = (ctypes.c_uint64 * 3)(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _check(_syscall(LANDLOCK_CREATE_RULESET, attr, size, 0), "Landlock ruleset")
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    readable = [*prefixes, "/usr", "/lib", "/lib64", "/etc/ld.so.cache"]
    rules = [(p, READ_FILE | (READ_DIR if os.path.isdir(p) else 0)) for p in readable if os.path.exists(p)]
    for path, access in [*rules, (work, fs & ~1)]:  # bit 0: execute
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = (ctypes.c_uint8 * 12).from_buffer_copy(access.to_bytes(8, "little") + fd.to_bytes(4, "little"))
        _check(_syscall(LANDLOCK_ADD_RULE, ruleset, 1, rule, 0), f"Landlock rule for {path}")
        os.close(fd)
    _check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs (prctl)")
    _check(_syscall(LANDLOCK_RESTRICT_SELF, ruleset, 0), "Landlock (restrict_self)")
    os.close(ruleset)


def seccomp() -> None:
    """A filter that refuses new sockets, new processes (threads stay allowed) and the kernel keyrings, and
    kills the process on a foreign system call ABI (x86_64's i386 one, say)."""
    if os.uname().machine not in SYSCALLS:
        raise Refused(f"seccomp: no filter for the {os.uname().machine} architecture")
    arch, denied, clone, clone3 = SYSCALLS[os.uname().machine]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|JGE|JSET|K, BPF_RET
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050001, 0x00050026, 0x80000000  # ERRNO: 0x00050000 | errno
    program = [
        (load, 0, 0, 4),  # seccomp_data.arch
        (jeq, 0, "kill", arch),
        (load, 0, 0, 0),  # seccomp_data.nr
        (jge, "eperm", 0, 0x40000000),  # x32 system calls
        *[(jeq, "eperm", 0, nr) for nr in denied],
        (jeq, "enosys", 0, clone3),  # its flags are out of the filter's reach: libc falls back to clone
        (jeq, 0, "allow", clone),
        (load, 0, 0, 16),  # clone's flags (the low half of args[0])
        (jset, "allow", "eperm", 0x10000),  # CLONE_THREAD
        *[(ret, 0, 0, action) for action in (allow, eperm, enosys, kill)],
    ]
    where = {label: len(program) - 4 + i for i, label in enumerate(("allow", "eperm", "enosys", "kill"))}
    raw = b""
    for i, (op, jt, jf, k) in enumerate(program):
        jt, jf = (where[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        raw += op.to_bytes(2, "little") + bytes([jt, jf]) + k.to_bytes(4, "little")
    filters = ctypes.create_string_buffer(raw, len(raw))
    fprog = (ctypes.c_uint64 * 2)(len(program), ctypes.addressof(filters))  # sock_fprog: length, pointer
    _check(LIBC.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp (prctl)")


def drop_capabilities() -> None:
    """The namespace's capabilities, which a user namespace's first process holds, all dropped."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    _check(LIBC.capset(header, (ctypes.c_uint32 * 6)()), "dropping capabilities (capset)")


class _Capped(io.TextIOBase):
    """Discards what the program prints, and fails once it printed more than ``OUTPUT_CHARS``."""

    left = OUTPUT_CHARS

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.left -= len(text)
        if self.left < 0:
            raise OSError(f"the program printed more than {OUTPUT_CHARS} characters")
        return len(text)


class _Timeout(BaseException):
    pass


def _alarm(*_):
    raise _Timeout()


def run(job: dict, results: int) -> None:
    """Load the program, then call it once per argument list, each call under its time limits: a Python
    exception at ``timeout_s``, and, for a loop in C that never returns to Python, death by SIGPROF once
    the call used twice that in CPU time."""
    me = os.getpid()

    def emit(**record):
        if os.getpid() != me:  # a fork of the program: only the program's own process reports
            os._exit(0)
        os.write(results, (json.dumps(record) + "\n").encode())

    def arm(seconds: float) -> None:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        signal.setitimer(signal.ITIMER_PROF, 2 * seconds if seconds else 0)

    sys.stdout = sys.stderr = _Capped()
    sys.stdin = io.StringIO()
    signal.signal(signal.SIGALRM, _alarm)
    namespace = {"__name__": "__sandbox__"}
    try:
        arm(job["timeout_s"])
        exec(compile(job["source"], "<program>", "exec"), namespace)
        arm(0)
        fn = namespace[job["entry_point"]]
    except _Timeout:
        emit(setup_error="timeout while loading the program")
        return
    except BaseException as e:
        emit(setup_error=f"{type(e).__name__}: {e}")
        return
    for args in job["calls"]:
        try:
            arm(job["timeout_s"])
            value = fn(*args)
            arm(0)
            emit(value=json.loads(json.dumps(value)))
        except _Timeout:
            emit(error="timeout")
        except BaseException as e:
            arm(0)
            emit(error=f"{type(e).__name__}: {e}"[:500])


def _no_network(*_, **__):
    raise PermissionError("network access is disabled in the sandbox")


def main(directory: str) -> None:
    with open(os.path.join(directory, "job.json")) as f:
        job = json.load(f)
    results, refusal = (
        os.open(os.path.join(directory, n), os.O_WRONLY | os.O_APPEND) for n in ("results", "refused")
    )
    work = os.path.join(directory, "work")
    try:
        if job["strict"]:
            enter_namespaces(work, job["disk_bytes"])
            if pid := os.fork():
                wait_and_exit(pid)
            if pid := os.fork():  # this process is the PID namespace's init: it only waits
                wait_and_exit(pid)
            os.setsid()  # a process group inside the namespace: kill(0, ...) reaches nothing outside
        os.chdir(work)
        set_limits(job)
        if job["strict"]:
            landlock(work)
            seccomp()
            drop_capabilities()
        else:
            import socket

            socket.socket = socket.create_connection = socket.getaddrinfo = _no_network
    except (Refused, OSError) as e:
        os.write(refusal, str(e).encode())
        os._exit(0)
    os.close(refusal)  # the program cannot write a refusal, which would stop the caller's every run
    run(job, results)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])

"""The sandbox isolates every failure a program can have, and never hangs."""

import time

import pytest

from pbbjax.tasks.sandbox import SandboxSetupError, run_calls

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
    assert errors[3].startswith("process died")
    assert "not JSON serializable" in errors[4]
    assert errors[5].startswith("PermissionError: network access is disabled")
    assert errors[6].startswith("MemoryError")


def test_a_program_that_fails_to_load_is_a_clear_error():
    with pytest.raises(SandboxSetupError, match="entry point 'g'.*KeyError"):
        run_calls("def f(x):\n    return x\n", "g", [[1]])
    with pytest.raises(SandboxSetupError, match="SyntaxError"):
        run_calls("def f(x) return x", "f", [[1]])
    with pytest.raises(SandboxSetupError, match="timeout while loading"):
        run_calls("while True:\n    pass\n", "f", [[1]], timeout_s=0.3)

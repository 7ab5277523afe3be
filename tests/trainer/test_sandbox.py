"""The Python sandbox: every escape attempt comes back quickly as an error observation.

Two layers are tested separately: the audit hook (plain Python calls) and, where this machine
gives them (`isolation()`), the OS limits, reached through ctypes so the hook cannot see them.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from posttrain.trainer.tools import sandbox
from posttrain.trainer.tools.sandbox import Limits, run_python

FAST = Limits(timeout_s=5.0)
ISO = sandbox.isolation()
needs_namespaces = pytest.mark.skipif(not ISO.namespaces, reason="no network/PID namespace here")
needs_uid_drop = pytest.mark.skipif(ISO.user == "same", reason="runs as the trainer's own user")

# libc through ctypes: what code that bypasses the interpreter's audit hook would do.
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def test_normal_call_returns_its_output_and_uses_its_own_directory():
    result = run_python(
        "import os\nopen('note.txt', 'w').write('kept')\n"
        "print(open('note.txt').read(), os.path.basename(os.getcwd())[:18])",
        FAST,
    )
    assert result.ok, result.observation()
    assert result.observation() == "kept posttrain-sandbox-\n"
    assert not result.timed_out and result.exit_code == 0


def test_error_in_code_is_an_observation_with_the_traceback():
    result = run_python("raise ValueError('boom')", FAST)
    assert not result.ok and result.exit_code == 1
    assert result.observation().startswith("Error: exit code 1")
    assert "ValueError: boom" in result.observation()


def test_endless_loop_is_killed_at_the_time_limit_with_its_children():
    start = time.perf_counter()
    result = run_python("print('started', flush=True)\nwhile True: pass", Limits(timeout_s=1.5))
    assert result.timed_out and result.exit_code is None
    assert time.perf_counter() - start < 10
    assert result.observation().startswith("Error: timed out after")
    assert "started" in result.observation()  # output before the kill is kept


def test_unbounded_allocation_fails_with_memory_error():
    start = time.perf_counter()
    result = run_python(
        "x = []\nwhile True: x.append(bytearray(1 << 24))", Limits(memory_bytes=512 << 20)
    )
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.observation()
    assert time.perf_counter() - start < 10


def test_fork_bomb_is_refused_by_the_hook():
    result = run_python("import os\nwhile True: os.fork()", FAST)
    assert not result.ok and not result.timed_out
    assert "process creation is not allowed (os.fork)" in result.observation()
    result = run_python("import subprocess\nsubprocess.run(['true'])", FAST)
    assert "process creation is not allowed" in result.observation()


@needs_uid_drop
def test_fork_bomb_through_libc_stops_at_the_process_limit():
    # ctypes fork is invisible to the audit hook; RLIMIT_NPROC under uid 65534 is what stops it.
    code = LIBC + (
        "n = 0\n"
        "while n < 200:\n"
        "    pid = libc.fork()\n"
        "    if pid == 0:\n"
        "        import time; time.sleep(30); os._exit(0)\n"
        "    if pid < 0:\n"
        "        print('fork failed after', n, os.strerror(ctypes.get_errno())); break\n"
        "    n += 1\n"
    )
    start = time.perf_counter()
    result = run_python(code, Limits(timeout_s=10, max_processes=8))
    assert result.ok, result.observation()
    assert "fork failed after" in result.stdout
    assert int(result.stdout.split()[3]) < 8
    # The sleeping children die with the call instead of holding the parent up for 30 s.
    assert time.perf_counter() - start < 10


def test_socket_is_refused_by_the_hook():
    result = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), 1)", FAST)
    assert "network access is not allowed (socket.__new__)" in result.observation()


def _libc_connect_to_a_host_server() -> tuple[str, bool]:
    """The child's libc connect() to a server on the host's loopback: (its output, accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted: list[object] = []
    server.settimeout(3)
    thread = threading.Thread(target=lambda: _accept(server, accepted))
    thread.start()
    code = LIBC + (
        "import struct\n"
        "fd = libc.socket(2, 1, 0)\n"  # AF_INET, SOCK_STREAM
        f"addr = struct.pack('!HH4s8x', 2, {port}, bytes([127, 0, 0, 1]))\n"
        "addr = struct.pack('=H', 2) + addr[2:]\n"  # sin_family is host order
        "rc = libc.connect(fd, addr, len(addr))\n"
        "print('connect', rc, os.strerror(ctypes.get_errno()))\n"
    )
    result = run_python(code, FAST)
    thread.join()
    server.close()
    assert result.ok, result.observation()
    return result.stdout, bool(accepted)


@needs_namespaces
def test_socket_through_libc_cannot_reach_the_hosts_loopback():
    # A server the parent can reach; from the child's network namespace it does not exist.
    stdout, accepted = _libc_connect_to_a_host_server()
    assert stdout.startswith("connect -1 "), stdout
    assert not accepted


def _accept(server: socket.socket, accepted: list[object]) -> None:
    try:
        conn, _ = server.accept()
        accepted.append(conn)
        conn.close()
    except OSError:
        pass


@pytest.fixture
def open_dir():
    """A world-writable directory: the OS would let the child write here, only the hook stops it."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_writes_outside_the_directory_are_refused_by_the_hook(open_dir):
    tmp_path = open_dir
    target = tmp_path / "escaped.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'a')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w')",
    ):
        result = run_python(code, FAST)
        assert not result.ok, code
        assert "outside the sandbox directory" in result.observation(), code
    assert not target.exists()
    (tmp_path / "x").write_text("x")
    (tmp_path / "x").chmod(0o666)
    result = run_python(f"import os\nos.remove({str(tmp_path)!r} + '/x')", FAST)
    assert "os.remove outside the sandbox directory" in result.observation()
    assert (tmp_path / "x").exists()


@pytest.mark.skipif(ISO.user != "full", reason="the child does not run fully as uid 65534 here")
def test_writes_through_libc_to_a_root_owned_directory_are_refused_by_the_os(tmp_path):
    target = tmp_path / "escaped.txt"  # pytest's tmp_path: owned by the trainer, mode 700
    code = LIBC + (
        f"fd = libc.open({str(target).encode()!r}, os.O_WRONLY | os.O_CREAT, 0o644)\n"
        "print('open', fd, os.strerror(ctypes.get_errno()))\n"
    )
    result = run_python(code, FAST)
    assert result.ok, result.observation()
    assert result.stdout.startswith("open -1 "), result.stdout
    assert not target.exists()


def test_file_size_limit_stops_endless_output():
    result = run_python("while True: print('x' * 1000)", Limits(file_bytes=1 << 20))
    assert not result.ok and not result.timed_out
    assert "File too large" in result.observation()
    assert len(result.stdout) <= Limits().output_chars + len("\n[output truncated]")


def test_limits_cannot_be_raised_and_other_processes_cannot_be_signalled():
    result = run_python("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", FAST)
    assert "changing limits is not allowed" in result.observation()
    result = run_python("import os\nos.kill(1, 9)", FAST)
    assert "signalling processes is not allowed" in result.observation()


def test_a_sandbox_that_cannot_start_is_an_error_observation():
    result = run_python("print(1)", FAST, python="/nonexistent/python")
    assert not result.ok
    assert result.observation().startswith("Error: ")


@pytest.mark.skipif(ISO.user != "full", reason="needs root with namespaces to build the fallback")
def test_real_uid_fallback_still_limits_processes_and_network(monkeypatch):
    # Where uid 65534 cannot read the interpreter, only the real uid changes (euid 0, no
    # capabilities): RLIMIT_NPROC and the network namespace must hold all the same.
    swap = {"--reuid": "--ruid", "--regid": "--rgid"}
    prefix = tuple(swap.get(arg, arg) for arg in ISO.prefix)
    fallback = sandbox.Isolation(namespaces=True, user="real-uid", prefix=prefix)
    monkeypatch.setattr(sandbox, "isolation", lambda python=None: fallback)
    ids = run_python(
        "import os\nprint(os.getresuid()[0], os.geteuid(), "
        "open('/proc/self/status').read().split('CapEff:')[1].split()[0])",
        FAST,
    )
    assert ids.stdout.split() == ["65534", "0", "0000000000000000"], ids.observation()
    test_fork_bomb_through_libc_stops_at_the_process_limit()
    test_socket_through_libc_cannot_reach_the_hosts_loopback()
    # The weakness docs/rl.md states: euid 0 may set the real uid back to 0, and uid 0 is exempt
    # from RLIMIT_NPROC, so here the process limit holds only against code that does not try.
    escape = LIBC + (
        "libc.setresuid(0, 0, 0)\nn = 0\n"
        "while n < 20 and (pid := libc.fork()) > 0:\n    n += 1\n"
        "if pid == 0:\n    import time; time.sleep(30)\nprint(n)\n"
    )
    result = run_python(escape, Limits(timeout_s=10, max_processes=8))
    assert result.stdout.split()[-1] == "20", result.observation()


@pytest.mark.skipif(ISO.user != "full", reason="the child does not run fully as uid 65534 here")
def test_full_uid_drop_has_no_way_back_to_root():
    result = run_python(LIBC + "print(libc.setuid(0), libc.setresuid(0, 0, 0))", FAST)
    assert result.stdout.split() == ["-1", "-1"], result.observation()


@pytest.mark.skipif(ISO.user != "full" or not ISO.namespaces, reason="needs root with namespaces")
def test_uid_drop_without_namespaces(monkeypatch):
    # Root without CAP_SYS_ADMIN (a default container) gets setpriv alone: the process limit
    # holds, the network is the audit hook's alone (libc reaches the host, as docs/rl.md says).
    prefix = ISO.prefix[ISO.prefix.index("--") + 1 :]
    assert "setpriv" in prefix[0]
    fallback = sandbox.Isolation(namespaces=False, user="full", prefix=prefix)
    monkeypatch.setattr(sandbox, "isolation", lambda python=None: fallback)
    test_fork_bomb_through_libc_stops_at_the_process_limit()
    test_socket_is_refused_by_the_hook()
    stdout, accepted = _libc_connect_to_a_host_server()
    assert stdout.startswith("connect 0 ") and accepted

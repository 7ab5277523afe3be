"""Run untrusted Python (a policy's code tool calls) in a contained child process.

`run_python(code)` never raises for anything the code does: a crash, a timeout or a blocked action
comes back as a `SandboxResult` whose `observation()` is the text to show the model, so a bad
completion cannot stop training. Each call gets:

- **its own process** (`python -I -B`, a new session) and **its own temporary directory** as cwd
  (deleted afterwards), an empty environment except PATH/HOME/TMPDIR;
- **a time limit**: on timeout the whole process group is killed (`killpg`, SIGKILL); in a PID
  namespace (below) the kernel also kills every descendant when the namespace's first process
  dies, including ones that left the process group with `setsid`;
- **resource limits** set in the child before the code runs, soft = hard so the code cannot raise
  them: RLIMIT_AS (memory), RLIMIT_FSIZE (largest file written, stdout included), RLIMIT_CPU,
  RLIMIT_NPROC (processes + threads of the child's real uid), RLIMIT_CORE 0;
- **Linux namespaces and dropped privileges** when the trainer runs as root (as in our images):
  `unshare --net --pid --fork` (a network namespace with no interface up: no network at all, the
  host's loopback included; a PID namespace: other processes cannot be signalled) and `setpriv` to
  uid 65534 with no capabilities and `no_new_privs`. RLIMIT_NPROC is never enforced for uid 0 or a
  process with CAP_SYS_RESOURCE/CAP_SYS_ADMIN, so the uid change is what makes the process limit
  real; without capabilities the code can neither raise its limits nor leave the namespaces.
  If uid 65534 can run the interpreter the child runs fully as that uid ("full"), so the OS
  also refuses writes to files it does not own. If not, only the *real* uid changes and the
  effective uid stays 0 without capabilities ("real-uid"): limits and namespaces hold, but code
  that reaches libc can set its real uid back to 0 (allowed to any process whose effective uid is
  0) and so escape RLIMIT_NPROC, and root-owned files are writable as far as the OS is concerned:
  there the audit hook alone stops forks and writes;
- **an audit hook** (`sys.addaudithook`, cannot be removed) installed before the code runs that
  refuses: socket creation, process creation (fork, exec, spawn, subprocess, os.system), signals
  to other processes, and file writes, renames, deletions or metadata changes outside the
  directory. This is an interpreter-level guard: code that reaches C directly (ctypes) gets past
  it, which is why the OS layers above are what the tests rely on where they are available.

`isolation()` says which layers this machine gives (probed once). What is OS-enforced and what is
only the interpreter's, per mode, is tabulated in docs/rl.md; the tests in
tests/trainer/test_sandbox.py check each limit, through ctypes where the OS is meant to hold.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SANDBOX_UID = 65534  # nobody

# The child's first code: limits, then the audit hook, then the user's code as __main__.
# Kept as source text because it runs in another interpreter (python -I, nothing imported from us).
_BOOTSTRAP = r"""
import os, resource, sys
_cfg = {cfg!r}
for _name, _value in _cfg["limits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
_root = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_PATH_EVENTS = {{"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
    "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.rmtree", "os.chflags",
    "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod"}}
_DENIED = {{"socket.__new__": "network access", "os.fork": "process creation",
    "os.forkpty": "process creation", "os.posix_spawn": "process creation",
    "os.exec": "process creation", "os.spawn": "process creation",
    "subprocess.Popen": "process creation", "os.system": "process creation",
    "pty.spawn": "process creation", "os.kill": "signalling processes",
    "os.killpg": "signalling processes", "resource.setrlimit": "changing limits",
    "resource.prlimit": "changing limits"}}

def _inside(path):
    if isinstance(path, int):  # an fd the process already holds
        return True
    path = os.fsdecode(path)
    real = os.path.realpath(path)
    return real == _root or real.startswith(_root + os.sep)

def _hook(event, args):
    if event in _DENIED:
        raise PermissionError(f"sandbox: {{_DENIED[event]}} is not allowed ({{event}})")
    if event == "open":
        path, _mode, flags = args  # flags are the os.open flags, also for open()
        if isinstance(flags, int) and flags & _WRITE_FLAGS and path is not None and not _inside(path):
            raise PermissionError(f"sandbox: writing outside the sandbox directory: {{path}}")
    elif event in _PATH_EVENTS:
        for arg in args:
            if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg):
                raise PermissionError(f"sandbox: {{event}} outside the sandbox directory: {{arg}}")

sys.addaudithook(_hook)
del _cfg, _name, _value
sys.argv = ["main.py"]
with open("main.py") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {{"__name__": "__main__", "__builtins__": __builtins__}})
"""


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_bytes: int = 1 << 30  # RLIMIT_AS: address space, so leave room above real use
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE: any one file written, stdout and stderr included
    max_processes: int = 16  # RLIMIT_NPROC; counts every process and thread of the child's uid
    output_chars: int = 8192  # stdout/stderr kept for the observation (each)


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What this machine gives the child beyond rlimits and the audit hook."""

    namespaces: bool  # network + PID namespace
    user: str  # "full" (uid 65534), "real-uid" (real uid 65534, euid 0, no caps) or "same"
    prefix: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when killed on timeout; negative: killed by that signal
    timed_out: bool
    seconds: float
    error: str | None = None  # the sandbox itself failed (could not start the process)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.timed_out and self.exit_code == 0

    def observation(self) -> str:
        """The text for the model: output on success, else what went wrong and the stderr tail."""
        if self.error is not None:
            return f"Error: sandbox failure: {self.error}"
        if self.timed_out:
            return f"Error: timed out after {self.seconds:.1f} s\n{self.stdout}".rstrip()
        if self.exit_code == 0:
            return self.stdout
        reason = f"exit code {self.exit_code}"
        if self.exit_code is not None and self.exit_code < 0:
            sig = -self.exit_code
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
            reason = f"killed by {name}" + (" (file size limit)" if sig == signal.SIGXFSZ else "")
        parts = [f"Error: {reason}", self.stdout, self.stderr]
        return "\n".join(p for p in parts if p).rstrip()


def _probe(prefix: list[str], python: str) -> bool:
    try:
        done = subprocess.run(
            [*prefix, python, "-I", "-c", "pass"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


@functools.cache
def isolation(python: str = sys.executable) -> Isolation:
    """Probe, once per interpreter, the strongest containment this machine allows."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    candidates: list[tuple[bool, str, list[str]]] = []
    if os.geteuid() == 0:
        ns = [unshare, "--net", "--pid", "--fork", "--kill-child", "--"] if unshare else []
        if setpriv:
            drop = ["--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
            uid = str(SANDBOX_UID)
            full = [setpriv, "--reuid", uid, "--regid", uid, *drop, "--"]
            real = [setpriv, "--ruid", uid, "--rgid", uid, *drop, "--"]
            if ns:
                candidates += [(True, "full", ns + full), (True, "real-uid", ns + real)]
            # Root without CAP_SYS_ADMIN (a default container): no namespaces, but the uid drop.
            candidates += [(False, "full", full), (False, "real-uid", real)]
    elif unshare:  # unprivileged user namespaces, where the kernel allows them
        ns = [unshare, "--user", "--map-current-user", "--net", "--pid", "--fork", "--kill-child"]
        candidates.append((True, "same", [*ns, "--"]))
    for namespaces, user, prefix in candidates:
        if _probe(prefix, python):
            return Isolation(namespaces, user, tuple(prefix))
    return Isolation(False, "same", ())


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(data) > limit else "")


def run_python(
    code: str, limits: Limits = Limits(), *, python: str = sys.executable
) -> SandboxResult:
    """Run `code` as a script in a fresh contained child; never raises for what the code does."""
    iso = isolation(python)
    start = time.perf_counter()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="posttrain-sandbox-") as work,
            tempfile.TemporaryDirectory(prefix="posttrain-sandbox-out-") as out,
        ):
            if iso.user == "full":  # the child's only writable directory
                os.chown(work, SANDBOX_UID, SANDBOX_UID)
            with open(os.path.join(work, "main.py"), "w") as f:
                f.write(code)
            cfg = {
                "limits": {
                    "RLIMIT_AS": limits.memory_bytes,
                    "RLIMIT_FSIZE": limits.file_bytes,
                    "RLIMIT_CPU": max(1, int(limits.timeout_s) + 1),
                    "RLIMIT_NPROC": limits.max_processes,
                    "RLIMIT_CORE": 0,
                }
            }
            argv = [*iso.prefix, python, "-I", "-B", "-c", _BOOTSTRAP.format(cfg=cfg)]
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
            # Output goes to files outside the sandbox directory, not pipes: RLIMIT_FSIZE bounds
            # them and an endless print loop cannot fill the trainer's memory.
            out_path, err_path = os.path.join(out, "stdout"), os.path.join(out, "stderr")
            with open(out_path, "wb") as so, open(err_path, "wb") as se:
                proc = subprocess.Popen(
                    argv,
                    cwd=work,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=so,
                    stderr=se,
                    start_new_session=True,  # its own process group, killed as a whole
                )
                timed_out = False
                try:
                    proc.wait(timeout=limits.timeout_s)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc.pid)
                    proc.wait()
            seconds = time.perf_counter() - start
            return SandboxResult(
                stdout=_read_capped(out_path, limits.output_chars),
                stderr=_read_capped(err_path, limits.output_chars),
                exit_code=None if timed_out else proc.returncode,
                timed_out=timed_out,
                seconds=seconds,
            )
    except (OSError, subprocess.SubprocessError) as err:  # could not start or clean up
        return SandboxResult("", "", None, False, time.perf_counter() - start, f"{err}")


def _kill_group(pgid: int) -> None:
    # Also after a normal exit: a background child left behind must not outlive the call.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def code_interpreter(code: str) -> str:
    """A tool for `ToolBox` (`posttrain.trainer.tools.sandbox:code_interpreter`): the sandbox's
    observation for `code`, with the default limits."""
    return run_python(code).observation()

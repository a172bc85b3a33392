"""Start child processes with posix_spawn instead of fork.

A process that has used gRPC can hang in fork(): gRPC's at-fork handlers wait for its own
threads (grpc/grpc#37259, open). The launcher checks health over gRPC between starts, and the
lab and tests drive gRPC before they start hosts, so they spawn: glibc's posix_spawn runs no
at-fork handlers. The child gets its own session (so the whole group can be signalled), and,
when asked, dies with its parent: a two-line shim sets PR_SET_PDEATHSIG and then execs the
real program (the setting survives exec), as preexec_fn used to.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# Runs in the child before exec: die with the parent; if it is already gone, do not start.
_SHIM = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)\n"  # PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or sys.exit(70)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class Spawned:
    """The handful of Popen's methods the launcher, the lab and the tests use."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        *,
        output: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        args = list(argv)
        if die_with_parent:
            args = [sys.executable, "-c", _SHIM, str(os.getpid()), *args]
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
        ]
        if output is not None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            actions += [
                (os.POSIX_SPAWN_OPEN, 1, str(output), flags, 0o644),
                (os.POSIX_SPAWN_DUP2, 1, 2),
            ]
        self.args = args
        self.returncode: int | None = None
        self.pid = os.posix_spawnp(args[0], args, dict(env), file_actions=actions, setsid=True)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

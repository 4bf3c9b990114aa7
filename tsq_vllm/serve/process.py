"""Run an OpenAI-compatible server as a child process: free port, wait for /health, stop its group.

Used by the serving tests, the serving benchmark and the main job's chat check, so that every one
of them starts, waits for and stops vLLM the same way. No vLLM import: the server is a command.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["free_port", "wait_healthy", "ServerProcess"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    base_url: str, timeout: float, proc: subprocess.Popen | None = None, poll: float = 1.0
) -> float:
    """Seconds until `base_url`/health answers 200; RuntimeError if `proc` exits or `timeout`
    passes."""
    start = time.monotonic()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"the server exited with status {proc.returncode} before it became healthy"
            )
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"no server answered at {base_url}/health within {timeout:.0f} s")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(poll)


class ServerProcess:
    """`cmd --port P` started in its own process group, output to `log`; a context manager.

    `startup_s` is the time to a healthy /health. On failure to start, the log's tail is in the
    error. `stop()` (or leaving the `with` block) ends the whole group: vLLM's engine runs in child
    processes that must not outlive the test or benchmark.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        log: str | Path,
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        timeout: float = 600,
    ):
        self.port = free_port()
        self.cmd = [*cmd, "--port", str(self.port)]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        try:
            self.startup_s = wait_healthy(self.base_url, timeout, self.proc)
        except RuntimeError as e:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{e}; log {self.log_path} ends with:\n{tail}") from None

    def stop(self) -> None:
        # The whole group, even when the leader is gone: its engine children may still run.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

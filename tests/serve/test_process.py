"""ServerProcess: waits for /health, reports a dead or silent server with its log, stops the
group."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tsq_vllm.serve.process import ServerProcess, wait_healthy

# A stand-in server: 200 on /health, 404 elsewhere; it also forks a child, as vLLM's engine does.
SERVER = r"""
import http.server, os, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
if os.fork() == 0:
    time.sleep(600)
    os._exit(0)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies (an orphan's zombie waits for init to reap
    it)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_healthy_server_is_reachable_and_its_group_is_stopped(tmp_path):
    with ServerProcess([sys.executable, "-c", SERVER], tmp_path / "log", timeout=60) as srv:
        assert srv.startup_s < 60
        with urllib.request.urlopen(f"{srv.base_url}/health", timeout=5) as r:
            assert r.status == 200
        pgid = srv.proc.pid
    assert srv.proc.poll() is not None
    deadline = time.monotonic() + 10
    while (
        _live_members(pgid) and time.monotonic() < deadline
    ):  # the forked child dies by SIGTERM too
        time.sleep(0.1)
    assert _live_members(pgid) == []


def test_server_that_exits_fails_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)exited with status 3.*boom"):
        ServerProcess(
            [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
            tmp_path / "log",
            timeout=60,
        )


def test_silent_server_times_out_and_is_killed(tmp_path):
    cmd = [sys.executable, "-c", "import time; time.sleep(600)"]
    with pytest.raises(RuntimeError, match=r"within 2 s"):
        ServerProcess(cmd, tmp_path / "log", timeout=2)


def test_wait_healthy_names_the_url():
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:9/health within 0 s"):
        wait_healthy("http://127.0.0.1:9", timeout=0, poll=0.01)

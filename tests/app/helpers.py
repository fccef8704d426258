"""What the app's tests share: the runs the fixtures train, a real ``sai-app`` process, and
plain HTTP requests to it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

RUNS = {"sgd-sai": "thing/sgd-sai", "adamw": "thing/adamw"}  # optimizer -> run key


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    url: str, *, method: str = "GET", data: bytes | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    """The status and body of one HTTP request; ``headers`` may set ``Host`` itself."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_get(url: str) -> int:
    return request(url)[0]


@contextlib.contextmanager
def serving(runs_dir: Path, *args: str) -> Iterator[str]:
    """A real ``sai-app`` process over ``runs_dir`` on a free port, with more command-line
    ``args``; gradio's cache, temp files and the log (``sai-app.log``) go beside
    ``runs_dir``. Stopped with Ctrl-C (SIGINT), as a user would."""
    port = free_port()
    work = runs_dir.parent
    env = {**os.environ, "GRADIO_TEMP_DIR": str(work / "gradio"), "TMPDIR": str(work)}
    log = (work / "sai-app.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from sai_diffusion.cli import app_entry; app_entry()",
         "--runs-dir", str(runs_dir), "--port", str(port), *args],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while True:
            assert proc.poll() is None, (work / "sai-app.log").read_text()
            try:
                if http_get(url + "/") == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "sai-app did not answer within 90 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

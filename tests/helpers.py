"""Specs shared by test modules that run real studies."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("DSE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SMALL_TRIALS = 4


def small_spec(storage: str, study: str, trials: int = SMALL_TRIALS) -> dict:
    """The default spec, shrunk: ``trials`` trials on 2 workers, 2 x 64 proxy tokens, 12 + 6 task documents,
    the final Pareto set promoted to the full tasks."""
    data = yaml.safe_load((ROOT / "examples" / "default.yaml").read_text())
    data.update(study=study, storage=storage, trials=trials, workers=2)
    data["tasks"] = [{"name": "shakespeare_lastword", "metric": "acc", "limit": 12},
                     {"name": "shakespeare_cloze", "metric": "acc_norm", "limit": 6}]
    data["sampler"] = {"name": "nsga2", "population": 4, "seed": 3}
    data["proxy"] = {"windows": 2, "seq_len": 64}
    data["promotion"] = {"every": 0, "final": True}
    data["heartbeat_s"] = 2
    return data


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(storage: str, port: int, log: Path):
    """``dse dashboard`` as a user starts it, in its own process group; returns once it answers HTTP."""
    import subprocess
    import sys
    import time
    import urllib.request

    handle = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "dse.cli", "dashboard", "--storage", storage, "--port", str(port)],
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dse dashboard exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"dse dashboard did not answer on port {port}: {log.read_text()[-2000:]}")


def stop(proc) -> None:
    """SIGTERM to the process group of a process :func:`start_dashboard` started (SIGKILL after 20 s); a process
    that exited already may have left children in its group, which go too."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:  # the whole group is gone
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def chromium(width: int = 1600, height: int = 2400):
    """Debian's headless Chromium through its ChromeDriver (``make browser`` installs both)."""
    import tempfile

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 f"--window-size={width},{height}", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)

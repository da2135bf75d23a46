"""Helpers for the dashboard's tests: a real gpuorch-dashboard process in front of a real local cluster,
and Debian's chromium driven by Playwright (never `playwright install`: its download fails offline)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

from tests.harness import Daemon, LocalCluster, free_port, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


def start_dashboard(cluster: LocalCluster, *extra: str, env: dict[str, str] | None = None) -> tuple[Daemon, str]:
    """Starts gpuorch-dashboard on a free loopback port against `cluster`; returns it and its base URL."""
    port = free_port()
    argv = [
        sys.executable, "-m", "gpuorch.dashboard.main", "--coordinator", cluster.address,
        "--listen", f"127.0.0.1:{port}", "--refresh-seconds", "0.5", "--log-format", "json", *extra,
    ]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "GPUORCH_TOKEN"}
    dashboard = Daemon(f"dashboard-{port}", argv, cluster.root / f"dashboard-{port}.log", env={**environment, **(env or {})})
    dashboard.start()
    base = f"http://127.0.0.1:{port}"

    def serving():
        if dashboard.process.poll() is not None:
            raise SystemExit(f"dashboard exited with {dashboard.process.returncode}:\n{dashboard.output()[-2000:]}")
        try:
            return get_json(base + "/api/v1")
        except OSError:
            return None

    wait_for(serving, timeout=20, interval=0.1, what="the dashboard to serve")
    return dashboard, base


def get_json(url: str, headers: dict[str, str] | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
        return json.loads(response.read())


def post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()

"""The dashboard in a real browser (Playwright driving Debian's chromium, headless) against a real
coordinator with tokens on, two agents with simulated GPUs, real jobs and the real dashboard process;
and a read-only one in front of a coordinator with tokens off.

Screenshots of each page go to docs/ (the README shows them) when GPUORCH_SCREENSHOTS=1.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

from gpuorch import Client
from gpuorch.v1 import job_pb2
from tests.dashboard_harness import CHROMIUM, CHROMIUM_ARGS, get_json, post, start_dashboard
from tests.harness import REPO, LocalCluster, wait_for

TOKENS = {"alice": ("alice-token-7f3", "user"), "bob": ("bob-token-92c", "user"), "ops": ("ops-token-1d8", "admin")}
WORKER = (
    "import time\nfrom gpuorch import worker\nfor i in range(100000):\n"
    "    print(f'step {i} loss {1 / (i + 1):.4f}', flush=True)\n"
    "    worker.report_progress(i + 1, samples=4, loss=1 / (i + 1))\n    time.sleep(0.2)\n"
)
SCREENSHOTS = os.environ.get("GPUORCH_SCREENSHOTS") == "1"
TIMEOUT_MS = 15_000


def tokens_file(path: Path) -> Path:
    lines = [
        f'[[tokens]]\nuser = "{user}"\nrole = "{role}"\nsha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
        for user, (token, role) in TOKENS.items()
    ]
    path.write_text("".join(lines))
    return path


@pytest.fixture(scope="module")
def browser():
    """Headless chromium, shared by a module's tests; skipped where Debian's chromium is missing."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium (scripts/test.sh does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    cluster = LocalCluster(root, token=TOKENS["ops"][0])
    (root / "coordinator.toml").write_text("straggler_window_seconds = 1.0\n")  # the job page's progress, soon
    cluster.start_coordinator("--tokens-file", str(tokens_file(root / "tokens.toml")), "--config", str(root / "coordinator.toml"))
    cluster.add_agent("node-a", 4)
    cluster.add_agent("node-b", 4)
    (root / "worker.py").write_text(WORKER)
    dashboard = None
    try:
        cluster.wait_for_nodes(2)
        dashboard, base = start_dashboard(cluster)
        yield cluster, base, root
    finally:
        if dashboard is not None:
            dashboard.stop()
        cluster.stop()


def client_of(cluster: LocalCluster, user: str) -> Client:
    return Client(cluster.address, timeout=5, token=TOKENS[user][0])


def sign_in(browser, base: str, user: str):
    context = browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(base + "/")
    page.wait_for_url("**/login**")
    page.fill("#token", TOKENS[user][0])
    page.click("#sign-in")
    page.wait_for_url(base + "/")
    (cookie,) = [cookie for cookie in context.cookies() if cookie["name"] == "gpuorch_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert TOKENS[user][0] not in cookie["value"]  # the token stays on the server
    return page


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        (REPO / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(REPO / "docs" / f"dashboard-{name}.png"))


def test_a_bad_token_is_refused_and_nothing_is_shown_before_sign_in(site, browser):
    _, base, _ = site
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    response = page.goto(base + "/queue")
    assert "script-src 'self'" in response.headers["content-security-policy"]  # (tests' wait_for_function needs bypass_csp)
    assert "/login" in page.url
    page.fill("#token", "not-a-token")
    page.click("#sign-in")
    page.wait_for_selector("#login-error")
    assert "refused" in page.inner_text("#login-error") and "/login" in page.url
    assert page.request.get(base + "/api/v1/nodes").status == 401
    page.close()


def test_cluster_queue_job_page_logs_and_cancel_by_the_owner_only(site, browser):
    cluster, base, root = site
    alice = sign_in(browser, base, "alice")
    alice.wait_for_function("document.querySelectorAll('.gpu').length === 8")
    assert alice.locator(".gpu.held").count() == 0
    assert "alice (user)" in alice.inner_text("#who")

    with client_of(cluster, "alice") as sdk:
        running = sdk.submit_job(argv=[sys.executable, str(root / "worker.py")], gpus=4, name="train", backend="gloo")
        waiting = sdk.submit_job(argv=[sys.executable, str(root / "worker.py")], gpus=8, name="big", backend="gloo")
    # The grid shows who holds the GPUs without a reload.
    alice.wait_for_function(f"document.querySelectorAll('.gpu.held[data-job=\"{running}\"]').length === 4")
    assert alice.evaluate("performance.getEntriesByType('navigation').length") == 1
    alice.locator(f'.gpu[data-job="{running}"]').first.click()
    alice.wait_for_selector("#detail canvas.chart")
    alice.wait_for_function("Number(document.querySelector('#detail canvas.chart').dataset.points) > 0")
    assert running in alice.inner_text("#detail")
    shot(alice, "cluster")

    alice.goto(base + "/queue")
    alice.wait_for_selector(f'#running tr[data-job="{running}"]')
    pending_row = alice.locator(f'#pending tr[data-job="{waiting}"]')
    pending_row.wait_for()
    assert pending_row.locator("td.reason").inner_text().strip()  # why it waits
    assert pending_row.locator("td.estimate").inner_text().strip()  # a time or "unknown"
    shot(alice, "queue")

    alice.goto(base + f"/jobs/{running}")
    alice.wait_for_function("document.querySelector('#state') && document.querySelector('#state').innerText.includes('RUNNING')")
    alice.wait_for_selector('.attempt[data-attempt="1"]')
    alice.wait_for_function("document.querySelector('#log').textContent.includes('step')")
    alice.wait_for_function("(document.querySelector('#throughput') || {}).innerText?.includes('steps/s')")
    assert "loss = " in alice.inner_text("#scalars")
    lines_before = alice.evaluate("document.querySelector('#log').textContent.split('step').length")
    alice.wait_for_function(f"document.querySelector('#log').textContent.split('step').length > {lines_before + 2}")
    shot(alice, "job")

    # Another user may not cancel it: the coordinator refuses, and the page says why.
    bob = sign_in(browser, base, "bob")
    bob.goto(base + f"/jobs/{running}")
    bob.wait_for_selector("#cancel")
    bob.once("dialog", lambda dialog: dialog.accept())
    bob.click("#cancel")
    bob.wait_for_function("document.querySelector('#action-message').innerText.includes('may only')")
    # An action without the CSRF token is refused, whoever sends it.
    refused = bob.request.post(base + f"/api/v1/jobs/{running}/cancel", data="{}", headers={"Content-Type": "application/json"})
    assert refused.status == 403 and "CSRF" in refused.text()
    forged = bob.request.post(
        base + f"/api/v1/jobs/{running}/cancel",
        data="{}",
        headers={"X-CSRF-Token": "guessed", "Content-Type": "application/json"},
    )
    assert forged.status == 403
    bob.context.close()

    # The owner may, and the page follows the job to CANCELLED without a reload.
    alice.once("dialog", lambda dialog: dialog.accept())
    alice.click("#cancel")
    alice.wait_for_function("document.querySelector('#state').innerText.includes('CANCELLED')")
    assert alice.evaluate("performance.getEntriesByType('navigation').length") == 1
    with client_of(cluster, "alice") as sdk:
        assert sdk.get_job(running).state == job_pb2.JOB_STATE_CANCELLED
        sdk.cancel_job(waiting)
    alice.context.close()


def test_an_admin_drains_and_resumes_a_node_and_usage_has_points(site, browser):
    cluster, base, _ = site
    ops = sign_in(browser, base, "ops")
    assert ops.locator("#admin-link").is_visible()
    ops.goto(base + "/admin")
    row = ops.locator('#admin-nodes tr[data-node="node-b"]')
    row.wait_for()
    row.locator(".reason-input").fill("swap PSU")
    row.locator("button.drain").click()
    ops.wait_for_function(
        "[...document.querySelectorAll('#admin-nodes tr[data-node=\"node-b\"] td')]"
        ".some((td) => td.innerText.includes('swap PSU'))"
    )
    assert cluster.client().get_node("node-b").drained
    shot(ops, "admin")
    ops.locator('#admin-nodes tr[data-node="node-b"] button.resume').click()
    wait_for(lambda: not cluster.client().get_node("node-b").drained, timeout=10, what="node-b resumed")

    ops.goto(base + "/usage")
    ops.wait_for_function("Number(document.querySelector('#allocation-chart').dataset.points) > 0")
    assert points_of(ops, "#utilisation-chart") > 0
    shot(ops, "usage")
    ops.context.close()


def points_of(page, selector: str) -> int:
    return int(page.evaluate(f"document.querySelector('{selector}').dataset.points"))


def test_with_tokens_off_the_dashboard_is_read_only_unless_told(tmp_path, browser):
    cluster = LocalCluster(tmp_path)
    cluster.start_coordinator()
    cluster.add_agent("node-a", 2)
    dashboard = None
    try:
        cluster.wait_for_nodes(1)
        dashboard, base = start_dashboard(cluster)
        job_id = cluster.client().submit_job(argv=["sleep", "60"], gpus=4, hold_if_too_big=True)
        page = browser.new_page(bypass_csp=True)
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(base + f"/jobs/{job_id}")
        page.wait_for_function("document.querySelector('#actions').innerText.includes('read-only')")
        assert page.locator("#cancel").count() == 0 and "read-only" in page.inner_text("#who")
        page.goto(base + "/")
        page.wait_for_function("document.querySelectorAll('.gpu').length === 2")
        csrf = page.locator("meta[name=csrf]").get_attribute("content")
        refused = page.request.post(base + f"/api/v1/jobs/{job_id}/cancel", data="{}", headers={"X-CSRF-Token": csrf or ""})
        assert refused.status == 403 and "read-only" in refused.text()
        assert get_json(base + "/api/v1/me")["can_act"] is False
        assert post(base + "/api/v1/nodes/node-a/drain", {"reason": "x"})[0] == 403
        assert not cluster.client().get_node("node-a").drained
        page.close()
    finally:
        if dashboard is not None:
            dashboard.stop()
        cluster.stop()

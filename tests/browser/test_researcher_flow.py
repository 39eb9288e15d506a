"""A researcher in a real browser: log in, create a project, watch it build, reach JupyterLab.

Debian's Chromium driven by Playwright against the repo's own hub process.
Set DS01_SCREENSHOTS=docs/screenshots to refresh the README's pictures.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from ds01_spawner import labels
from tests.browser.hubs import browser_hub, screenshots

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") or os.environ.get("DS01_REQUIRE_DOCKER"):
            pytest.fail("chromium missing: run scripts/bootstrap --browser")
        pytest.skip("chromium missing: run scripts/bootstrap --browser")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def test_researcher_creates_project_and_reaches_jupyterlab(browser, tmp_path):
    shots = screenshots(tmp_path)
    with browser_hub(tmp_path, ["researcher"]) as (hub, engine):
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        page.goto(f"{hub.url}/hub/login")
        page.fill("#username_input", "researcher")
        page.fill("#password_input", "any-password")
        page.click("#login_submit")

        page.wait_for_selector("#ds01-new-name")
        page.fill("#ds01-new-name", "my-thesis")
        page.select_option("#ds01-new-type", "base")
        page.screenshot(path=str(shots / "picker.png"))
        with page.expect_request(lambda r: r.method == "POST" and "/hub/spawn" in r.url):
            page.click("#spawn_form [type=submit]", no_wait_after=True)
        # The hub answers the form only after up to 10 s (slow_spawn_timeout); a
        # first build is often faster. Open the spawn page as soon as the spawn is
        # pending: the hub replays the spawn's event history to every reader.
        deadline = time.monotonic() + 30
        while hub.api("GET", "users/researcher").json()["servers"].get("", {}).get("pending") != (
            "spawn"
        ):
            assert time.monotonic() < deadline, "spawn never became pending"
            time.sleep(0.05)
        page.goto(f"{hub.url}/hub/spawn-pending/researcher")
        page.click("#progress-details summary")
        page.wait_for_function(
            "document.querySelector('#progress-log').textContent.includes('Step 1/')",
            timeout=120_000,
        )
        log = page.text_content("#progress-log")
        assert "Building image ds01-researcher/my-thesis:latest" in log
        page.screenshot(path=str(shots / "spawn-progress.png"))

        page.wait_for_url("**/user/researcher/**", timeout=240_000)
        page.wait_for_selector(".jp-LabShell", timeout=120_000)
        page.screenshot(path=str(shots / "jupyterlab.png"))
        assert "/user/researcher/" in page.url

        (c,) = engine.containers.list(filters={"label": [f"{labels.USER}=researcher"]})
        assert c.labels[labels.PROJECT] == "my-thesis"

"""The usage page in a real browser: alice runs on a (simulated) GPU, stops, and sees her
GPU-hours; the admin sees everyone's per user and downloads the CSV.

Set DS01_SCREENSHOTS=docs/screenshots to refresh docs/screenshots/usage.png.
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from ds01_spawner.usage import CSV_HEADER
from tests.browser.hubs import browser_hub, screenshots
from tests.integration.hubprocess import HubProcess

from .test_researcher_flow import browser  # noqa: F401  (the Chromium fixture)

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def log_in(browser, hub: HubProcess, name: str):  # noqa: F811
    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", name)
    page.fill("#password_input", "any-password")
    page.click("#login_submit")
    page.wait_for_url(lambda url: "/hub/login" not in url)
    return page


def wait_stopped(hub: HubProcess, user: str, server: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server in hub.api("GET", f"users/{user}").json()["servers"]:
        assert time.monotonic() < deadline, f"{user}/{server} still there after {timeout}s"
        time.sleep(0.3)


def test_gpu_hours_on_the_usage_page_for_a_researcher_and_the_admin(browser, tmp_path):  # noqa: F811
    shots = screenshots(tmp_path)
    with browser_hub(tmp_path, ["alice"], DS01_SIMULATED_GPUS="2") as (hub, _engine):
        hub.api("POST", "users/alice")
        r = hub.api(
            "POST", "users/alice/servers/train", data=json.dumps({"user_options": {"gpus": 1}})
        )
        assert r.status_code in (201, 202), r.text
        hub.wait_ready("alice", "train")
        time.sleep(3)  # a few seconds on the GPU
        assert hub.api("DELETE", "users/alice/servers/train").status_code in (202, 204)
        wait_stopped(hub, "alice", "train")

        page = log_in(browser, hub, "alice")
        page.goto(f"{hub.url}/services/ds01/usage")  # OAuth through the hub
        page.wait_for_selector("#projects")
        row = page.locator('#projects tr[data-project="train"]')
        assert float(row.locator("td.hours").first.get_attribute("data-gpu-hours")) > 0
        assert page.locator("#chart svg rect").count() >= 2
        assert page.locator('a[href$="/services/ds01/usage"]').count() == 1, "in the nav"
        page.screenshot(path=str(shots / "usage.png"), full_page=True)

        admin = log_in(browser, hub, "admin")
        admin.goto(f"{hub.url}/services/ds01/usage?all=1")
        admin.wait_for_selector("#users")
        hours = admin.locator('#users tr[data-user="alice"] td.hours').first
        assert float(hours.get_attribute("data-gpu-hours")) > 0
        assert admin.locator('#groups tr[data-group=""]').count() == 1, "alice: no group"

        with admin.expect_download() as download:
            admin.click("#csv")
        text = Path(download.value.path()).read_text()
        lines = list(csv.reader(io.StringIO(text)))
        assert lines[0] == list(CSV_HEADER)
        assert [(line[1], line[3]) for line in lines[1:]] == [("alice", "train")]
        assert float(lines[1][4]) > 0
        assert download.value.suggested_filename.startswith("ds01-usage-all-")

"""The ds01 service's alerts where the researcher works, in real containers of the base
image: JupyterLab's banner (the hand-written labextension ds01-alerts, fed by the
server extension ds01_alerts) in Chromium, and the terminal's notice.

Most tests use one container running plain `jupyter lab` with a token, its
workspace a directory of the test's; the last one goes through a real hub
(jupyterhub-singleuser, the hub's login cookie) as a researcher would.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import docker
import pytest
import requests

from ds01_spawner.identity import user_slug
from tests.browser.hubs import browser_hub
from tests.conftest import BASE_IMAGE

from .test_researcher_flow import browser  # noqa: F401  (the Chromium fixture)

pytestmark = pytest.mark.integration

UID = 1000  # the spawner runs containers as the researcher's uid, never root
WARNING = 'Your server "thesis" will be retired at 15:34 (in 30 min) if it stays idle.'


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Lab:
    """One container of the base image running JupyterLab on 127.0.0.1:<port>."""

    def __init__(self, workspace: Path, container, port: int, token: str) -> None:
        self.workspace, self.container, self.token = workspace, container, token
        self.url = f"http://127.0.0.1:{port}"

    @property
    def alerts(self) -> Path:
        return self.workspace / ".ds01-alerts"

    def write(self, *lines: str) -> None:
        self.alerts.write_text("".join(f"{line}\n" for line in lines))

    def append(self, line: str) -> None:
        with self.alerts.open("a") as f:
            f.write(f"{line}\n")

    def exec(self, *cmd: str) -> tuple[int, str]:
        code, out = self.container.exec_run(list(cmd), user=f"{UID}:{UID}")
        return code, out.decode(errors="replace")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("alerts") / "workspace"
    workspace.mkdir()
    os.chown(workspace, UID, UID)
    token = secrets.token_hex(16)
    engine = docker.from_env()
    container = None
    try:
        container = engine.containers.run(
            BASE_IMAGE,
            [
                "jupyter",
                "lab",
                "--ip=0.0.0.0",
                "--port=8888",
                "--no-browser",
                f"--IdentityProvider.token={token}",
            ],
            name=f"ds01-test-alerts-{uuid.uuid4().hex[:8]}",
            user=f"{UID}:{UID}",
            volumes={str(workspace): {"bind": "/workspace", "mode": "rw"}},
            ports={"8888/tcp": ("127.0.0.1", None)},
            detach=True,
        )
        container.reload()
        port = int(container.ports["8888/tcp"][0]["HostPort"])
        lab = Lab(workspace, container, port, token)
        deadline = time.monotonic() + 90
        while True:
            try:
                r = requests.get(f"{lab.url}/api/status", params={"token": token}, timeout=2)
                if r.status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            container.reload()
            assert container.status == "running", container.logs().decode()[-3000:]
            assert time.monotonic() < deadline, container.logs().decode()[-3000:]
            time.sleep(0.5)
        yield lab
    finally:
        if container is not None:
            container.remove(force=True)
        engine.close()


def open_lab(browser, url: str, errors: list[str] | None = None):  # noqa: F811
    """A fresh browser (its own localStorage) on JupyterLab, once the shell is up; what
    the page logs as errors and warnings goes to `errors`."""
    page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    if errors is not None:
        page.on("console", lambda m: m.type in ("error", "warning") and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector(".jp-LabShell", timeout=120_000)
    return page


def top_panel_y(page) -> float:
    return page.locator("#jp-top-panel").bounding_box()["y"]


def banner_rows(page) -> list[str]:
    return page.locator("#ds01-alerts-banner .ds01-alert-message").all_text_contents()


def test_the_image_has_the_labextension_enabled_and_ok(lab):
    code, out = lab.exec("jupyter", "labextension", "list")
    assert code == 0, out
    line = next(line for line in out.splitlines() if "ds01-alerts" in line)
    assert "enabled" in line and "OK" in line


def test_a_new_terminal_prints_the_alert_once(lab):
    lab.write(f"{now()} warning {WARNING}", f"{now()} info \x1b[31mno escapes\x07")
    code, out = lab.exec("bash", "-ic", "true")  # what a JupyterLab terminal runs first
    assert code == 0, out
    assert f"ds01: {WARNING}" in out
    assert "ds01: [31mno escapes" in out and "\x1b" not in out and "\x07" not in out
    assert "ds01:" not in lab.exec("bash", "-ic", "true")[1], "shown once per container"


def test_the_server_extension_answers_the_alerts_as_json(lab):
    lab.write("junk", f"{now()} warning {WARNING}")
    r = requests.get(f"{lab.url}/ds01/alerts", params={"token": lab.token}, timeout=10)
    assert r.status_code == 200
    assert [a["message"] for a in r.json()["alerts"]] == [WARNING]
    assert requests.get(f"{lab.url}/ds01/alerts", timeout=10).status_code == 403


@pytest.mark.browser
def test_the_banner_shows_a_warning_and_dismiss_hides_it_for_good(lab, browser):  # noqa: F811
    lab.write(f"{now()} warning {WARNING}")
    errors: list[str] = []
    page = open_lab(browser, f"{lab.url}/lab?token={lab.token}", errors)
    banner = page.locator("#ds01-alerts-banner")
    banner.wait_for(state="visible", timeout=30_000)
    assert banner_rows(page) == [WARNING]
    # JupyterLab moved down, below the banner: its menu bar stays usable
    bottom = banner.bounding_box()["y"] + banner.bounding_box()["height"]
    assert top_panel_y(page) >= bottom - 1

    page.click("#ds01-alerts-banner .ds01-alerts-dismiss")
    banner.wait_for(state="hidden")
    page.wait_for_function("document.querySelector('#jp-top-panel').getBoundingClientRect().y == 0")
    page.reload()
    page.wait_for_selector(".jp-LabShell", timeout=120_000)
    page.wait_for_timeout(3000)  # the first poll has come back
    assert not banner.is_visible(), "dismissed: stays hidden in this browser"
    assert not [e for e in errors if "ds01" in e], errors


@pytest.mark.browser
def test_a_new_alert_shows_at_the_next_poll_as_plain_text(lab, browser):  # noqa: F811
    lab.alerts.unlink(missing_ok=True)
    page = open_lab(browser, f"{lab.url}/lab?token={lab.token}")
    page.wait_for_timeout(3000)
    assert not page.locator("#ds01-alerts-banner").is_visible(), "no file: no banner"

    hostile = 'Retired <img src=x onerror="document.title=1"><b>bold</b>'
    lab.write(f"{now()} warning {WARNING}")
    lab.append(f"{now()} retired {hostile}")
    page.wait_for_selector("#ds01-alerts-banner:not([hidden])", timeout=45_000)  # one poll
    assert banner_rows(page) == [hostile, WARNING], "newest first"
    assert page.locator("#ds01-alerts-banner img, #ds01-alerts-banner b").count() == 0
    assert page.get_attribute("#ds01-alerts-banner", "class") == "ds01-level-retired"


@pytest.mark.browser
def test_the_banner_under_the_hub(browser, tmp_path):  # noqa: F811
    """jupyterhub-singleuser in a project container, the researcher logged in to the hub."""
    with browser_hub(tmp_path, ["alice"]) as (hub, _engine):
        hub.api("POST", "users/alice")
        r = hub.api("POST", "users/alice/servers/thesis", data=json.dumps({"user_options": {}}))
        assert r.status_code in (201, 202), r.text
        hub.wait_ready("alice", "thesis")
        alerts = hub.data_dir / "workspaces" / user_slug("alice") / "thesis" / ".ds01-alerts"
        alerts.write_text(f"{now()} warning {WARNING}\n")

        page = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
        page.goto(f"{hub.url}/hub/login")
        page.fill("#username_input", "alice")
        page.fill("#password_input", "any-password")
        page.click("#login_submit")
        page.wait_for_url(lambda url: "/hub/login" not in url)
        page.goto(f"{hub.url}/user/alice/thesis/lab")
        page.wait_for_selector(".jp-LabShell", timeout=120_000)
        page.locator("#ds01-alerts-banner").wait_for(state="visible", timeout=30_000)
        assert banner_rows(page) == [WARNING]

"""A researcher in a real browser on the image-update page, under a hub base URL:
open it from the hub's Services menu, add a package, watch the build, restart, import it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import urljoin

import docker
import pytest

from tests.integration.hubprocess import HubProcess, remove_user_objects
from tests.pkgindex import PackageIndex

from .test_researcher_flow import browser  # noqa: F401  (the Chromium fixture)

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def test_add_package_rebuild_and_restart_from_the_page(browser, tmp_path):  # noqa: F811
    shots = Path(os.environ.get("DS01_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "data"
    data.mkdir()
    engine = docker.from_env()
    with PackageIndex(tmp_path / "index", {"ds01hello": "1.0"}) as index:
        hub = HubProcess(
            data,
            tmp_path / "hub.log",
            base_url="/lab/",
            DS01_PIP_INDEX_URL=index.url,
            DS01_BUILD_NETWORK="host",
        )
        hub.start()
        try:
            hub.api("POST", "users/alice")
            r = hub.api("POST", "users/alice/servers/thesis", data=json.dumps({"user_options": {}}))
            assert r.status_code in (201, 202), r.text
            hub.wait_ready("alice", "thesis")

            page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
            page.goto(f"{hub.url}/hub/login")
            page.fill("#username_input", "alice")
            page.fill("#password_input", "any-password")
            page.click("#login_submit")
            page.goto(f"{hub.url}/hub/home")
            service_link = page.locator('a[href$="/services/ds01/"]').first
            assert service_link.count() == 1, "ds01 is in the hub's Services menu"
            # via the hub: OAuth sign-in
            page.goto(urljoin(page.url, service_link.get_attribute("href")))
            page.wait_for_selector("#projects")
            assert "/lab/services/ds01/" in page.url
            page.click("text=thesis")

            page.fill("#add_pip", "ds01hello==1.0")
            page.click("#add-packages button[type=submit]")
            page.wait_for_selector("#message")
            assert "Packages updated" in page.text_content("#message")
            assert "ds01hello==1.0" in page.text_content("#packages")

            page.click("#rebuild button[type=submit]")
            page.wait_for_function(
                "document.getElementById('status').textContent.includes('Build succeeded')",
                timeout=180_000,
            )
            assert "ds01hello" in page.text_content("#log")
            page.screenshot(path=str(shots / "image-page.png"), full_page=True)

            page.click("#restart button[type=submit]")
            page.wait_for_selector("#message")
            hub.wait_ready("alice", "thesis", timeout=120)
            (c,) = engine.containers.list(filters={"label": ["ds01.user=alice"]})
            code, out = c.exec_run(["python", "-c", "import ds01hello; print(ds01hello.VALUE)"])
            assert (code, out.decode().strip()) == (0, "42")
        finally:
            hub.stop()
            remove_user_objects(engine, "alice")
            engine.close()

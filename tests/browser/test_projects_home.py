"""The projects home in a real browser: the hub's /hub/home lists alice's projects with their
states, starts one on a (simulated) GPU, and opens its image page; a new project that waits
for the only GPU shows its place in the queue, and runs once the GPU frees.

Set DS01_SCREENSHOTS=docs/screenshots to refresh docs/screenshots/home.png.
"""

from __future__ import annotations

import json

import pytest

from ds01_spawner import labels
from tests.browser.hubs import browser_hub, screenshots

from .test_researcher_flow import browser  # noqa: F401  (the Chromium fixture)
from .test_usage_page import log_in, wait_stopped

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ROW = '#ds01-projects tr[data-project="{}"]'
# a script on this origin without the service's XSRF token: the service's cookie is not
# enough for it (JupyterHub sends it to sign in again: a redirect it cannot read)
READ_WITHOUT_TOKEN = """async () => {
  const r = await fetch("/services/ds01/api/home", {redirect: "manual"});
  return r.type;
}"""


def test_the_home_lists_starts_and_links_projects(browser, tmp_path):  # noqa: F811
    shots = screenshots(tmp_path)
    with browser_hub(tmp_path, ["alice"], DS01_SIMULATED_GPUS="2") as (hub, engine):
        hub.api("POST", "users/alice")
        for name in ("draft", "thesis"):
            body = json.dumps({"user_options": {}})
            r = hub.api("POST", f"users/alice/servers/{name}", data=body)
            assert r.status_code in (201, 202), r.text
            hub.wait_ready("alice", name)
        assert hub.api("DELETE", "users/alice/servers/draft").status_code in (202, 204)
        wait_stopped(hub, "alice", "draft")

        page = log_in(browser, hub, "alice")
        page.goto(f"{hub.url}/hub/home")
        thesis, draft = page.locator(ROW.format("thesis")), page.locator(ROW.format("draft"))
        thesis.wait_for(timeout=30_000)
        assert page.url == f"{hub.url}/hub/home", "the token's fragment is dropped"
        assert thesis.get_attribute("data-state") == "running"
        assert thesis.locator(".ds01-status .badge").text_content() == "running"
        assert thesis.locator(".ds01-open").get_attribute("href") == "/user/alice/thesis/"
        assert draft.get_attribute("data-state") == "stopped"
        assert draft.locator(".ds01-status .badge").text_content() == "stopped"
        assert draft.locator(".ds01-image").text_content().startswith("built ")
        assert draft.locator(".ds01-gpus option").all_text_contents() == ["No GPU", "1 GPU"]
        assert page.locator("#start").count() == 1, "the hub's own Start My Server stays"
        assert page.evaluate(READ_WITHOUT_TOKEN) == "opaqueredirect"
        page.screenshot(path=str(shots / "home.png"), full_page=True)

        draft.locator(".ds01-gpus").select_option("1")
        draft.locator(".ds01-start").click()
        page.locator(ROW.format("draft") + '[data-state="running"]').wait_for(timeout=180_000)
        assert draft.locator(".ds01-gpus-held").text_content() == "1"
        (container,) = engine.containers.list(
            filters={"label": [f"{labels.USER}=alice", f"{labels.PROJECT}=draft"]}
        )
        assert container.labels[labels.GPU_UUIDS]
        assert page.text_content("#ds01-message") in ("Started draft", "Starting draft")

        draft.locator(".ds01-image-page").click()
        page.wait_for_url("**/services/ds01/images/alice/draft")
        page.wait_for_selector("#packages")


def test_a_new_project_waits_for_a_gpu_on_the_home_and_runs_when_it_frees(browser, tmp_path):  # noqa: F811
    policy = tmp_path / "policy.yaml"  # no GPU kept for a stopped project: it goes to the queue
    policy.write_text("defaults:\n  max_gpus: 1\n  max_gpus_per_project: 1\n")
    with browser_hub(
        tmp_path, ["alice", "bob"], DS01_SIMULATED_GPUS="1", DS01_POLICY_FILE=str(policy)
    ) as (hub, _engine):
        hub.api("POST", "users/bob")
        body = json.dumps({"user_options": {"gpus": 1}})
        assert hub.api("POST", "users/bob/servers/hog", data=body).status_code in (201, 202)
        hub.wait_ready("bob", "hog")

        page = log_in(browser, hub, "alice")
        page.goto(f"{hub.url}/hub/home")
        page.wait_for_selector("#ds01-new:not(.d-none)")
        page.fill("#ds01-new-project", "train")
        page.select_option("#ds01-new-project-type", "base")
        page.select_option("#ds01-new-gpus", "1")
        page.check("#ds01-new-wait")
        page.click("#ds01-new button[type=submit]")
        train = page.locator(ROW.format("train"))
        page.locator(ROW.format("train") + '[data-state="waiting"]').wait_for(timeout=180_000)
        assert train.locator(".ds01-status .badge").text_content() == "waiting (1st)"
        assert "in line" in train.locator(".ds01-status-message").text_content()
        assert train.locator(".ds01-stop").count() == 1, "a wait can be given up"

        assert hub.api("DELETE", "users/bob/servers/hog").status_code in (202, 204)
        page.locator(ROW.format("train") + '[data-state="running"]').wait_for(timeout=120_000)
        assert train.locator(".ds01-gpus-held").text_content() == "1"

"""The project picker (the spawner's options form) through the hub's real pages."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from jupyterhub.tests.utils import async_requests, get_page, public_host

from ds01_spawner.identity import user_slug


async def post_form(h, user, cookies, data, server=""):
    url = (
        public_host(h.app) + h.app.hub.base_url + f"spawn/{user}" + (f"/{server}" if server else "")
    )
    return await async_requests.post(
        url, data={**data, "_xsrf": cookies["_xsrf"]}, cookies=cookies, allow_redirects=False
    )


def checked_project(page: str) -> str | None:
    m = re.search(r'<input[^>]*name="project"[^>]*value="([^"]+)"[^>]*checked', page)
    return m.group(1) if m else None


async def test_picker_creates_lists_and_preselects_projects(hub, dirs):
    h = await hub()
    user = h.new_user()
    cookies = await h.app.login_user(user)

    page = (await get_page(f"spawn/{user}", h.app, cookies=cookies)).text
    assert 'name="new_project"' in page
    for t in ("base", "pytorch", "cv", "nlp"):
        assert f'<option value="{t}"' in page

    r = await post_form(
        h, user, cookies, {"project": "__new__", "new_project": "thesis", "type": "base"}
    )
    assert r.status_code == 302, r.text
    await h.wait_ready(user)
    assert h.container(user, "thesis").labels["ds01.type"] == "base"
    await h.stop(user)

    await h.start(user, "second", options={"type": "base"})
    await h.stop(user, "second")

    page = (await get_page(f"spawn/{user}", h.app, cookies=cookies)).text
    assert "thesis" in page and "second" in page
    assert page.count(">image built<") == 2
    assert checked_project(page) == "second", "the last used project is preselected"

    r = await post_form(h, user, cookies, {"project": "thesis"})
    assert r.status_code == 302, r.text
    await h.wait_ready(user)
    assert h.container(user, "thesis").status == "running"


async def test_picker_refuses_bad_names_and_creates_nothing(hub, dirs):
    h = await hub()
    user = h.new_user()
    cookies = await h.app.login_user(user)
    for bad in ["../etc", "Bad Name", "x" * 40, "a--b", "<script>alert(1)</script>"]:
        r = await post_form(
            h, user, cookies, {"project": "__new__", "new_project": bad, "type": "base"}
        )
        assert r.status_code == 400, (bad, r.status_code)
        assert "invalid project name" in r.text
        assert "<script>alert(1)</script>" not in r.text, "user input is escaped on the page"
    await asyncio.sleep(0.2)
    assert not (Path(dirs["workspace_root"]) / user_slug(user)).exists()
    assert h.containers(user) == [] and h.images(user) == []


async def test_named_server_with_existing_project_skips_the_picker(hub):
    h = await hub()
    user = h.new_user()
    await h.start(user, "thesis")
    await h.stop(user, "thesis")
    cookies = await h.app.login_user(user)
    r = await get_page(f"spawn/{user}/thesis", h.app, cookies=cookies, allow_redirects=False)
    assert r.status_code == 302, "no form: the server starts its project straight away"
    await h.wait_ready(user, "thesis")


async def test_picker_offers_gpus_up_to_the_limit_and_starts_with_one(hub):
    h = await hub(simulated_gpus=4, policy={"defaults": {"max_gpus": 2}})
    user = h.new_user()
    cookies = await h.app.login_user(user)
    page = (await get_page(f"spawn/{user}", h.app, cookies=cookies)).text
    assert '<option value="2">2 GPUs</option>' in page
    assert '<option value="3">' not in page, "never more than the user's limit"
    assert "4 of 4 GPUs free right now" in page

    r = await post_form(
        h,
        user,
        cookies,
        {"project": "__new__", "new_project": "train", "type": "base", "gpus": "1"},
    )
    assert r.status_code == 302, r.text
    await h.wait_ready(user)
    c = h.container(user, "train")
    assert c.labels["ds01.gpu.uuids"].startswith("GPU-")
    page = (await get_page(f"spawn/{user}/second", h.app, cookies=cookies)).text
    assert "3 of 4 GPUs free right now" in page

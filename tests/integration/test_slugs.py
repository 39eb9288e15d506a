"""Two hub users whose names fold to one slug keep separate projects, end to end.

``h.baker@uni.edu`` folds to ``h-baker-uni-edu-<hash>``, a plain name another
hub user can have. Each must see, open and build only their own projects.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from jupyterhub.tests.utils import add_user, get_page

from ds01_spawner.identity import user_slug as natural_slug  # name-only, as before
from ds01_spawner.projects import Project, ProjectStore

from .test_picker import post_form

REPO = Path(__file__).resolve().parents[2]


def add_twins(h) -> tuple[str, str]:
    """An e-mail-style hub user, and a plain one named like the first one's natural slug."""
    fold = f"h.baker{uuid.uuid4().hex[:6]}@uni.edu"
    twin = natural_slug(fold)
    for name in (fold, twin):
        add_user(h.app.db, h.app, name=name)
        h.users.append(name)
    return fold, twin


def workspace_of(container) -> Path:
    container.reload()
    mounts = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
    return Path(mounts["/workspace"]).resolve()


def listed(page: str, project: str) -> bool:
    return f'id="ds01-project-{project}"' in page


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


async def start_in_picker(h, user: str, project: str) -> None:
    cookies = await h.app.login_user(user)
    page = (await get_page(f"spawn/{user}", h.app, cookies=cookies)).text
    assert 'name="new_project"' in page
    assert not listed(page, project), f"{user}'s picker lists another user's {project!r}"
    r = await post_form(
        h, user, cookies, {"project": "__new__", "new_project": project, "type": "base"}
    )
    assert r.status_code == 302, r.text
    await h.wait_ready(user)


async def test_a_literal_twin_never_sees_or_opens_the_fold_users_project(hub):
    h = await hub()
    fold, twin = add_twins(h)
    await h.start(fold, options={"project": "thesis", "type": "base"})
    theirs = h.container(fold, "thesis")
    their_workspace = workspace_of(theirs)
    (their_workspace / "notes.txt").write_text("h.baker's work")
    before = files_under(their_workspace)
    their_image = theirs.image.id

    await start_in_picker(h, twin, "thesis")

    mine = h.container(twin, "thesis")
    assert mine.name != theirs.name
    assert workspace_of(mine) != their_workspace
    assert workspace_of(mine).parent != their_workspace.parent, "a workspace root of its own"
    assert set(mine.image.tags).isdisjoint(theirs.image.tags)
    assert files_under(their_workspace) == before, "h.baker's workspace is untouched"
    theirs.reload()
    assert theirs.status == "running" and theirs.image.id == their_image

    await h.stop(fold)
    cookies = await h.app.login_user(fold)
    page = (await get_page(f"spawn/{fold}", h.app, cookies=cookies)).text
    assert listed(page, "thesis"), "h.baker still has their project"


async def test_an_existing_install_keeps_its_slugs_when_the_twin_signs_in_first(hub, dirs):
    """Objects from before the slug registry lie under natural slugs; they stay their owner's."""
    h = await hub()
    fold, twin = add_twins(h)
    dockerfile = (REPO / "images" / "types" / "base" / "Dockerfile").read_text()
    their_workspace = h.seed_workspace(fold, "thesis", dockerfile)[0].resolve()
    (their_workspace / "notes.txt").write_text("h.baker's work")
    ProjectStore(dirs["state_dir"]).save(
        natural_slug(fold), Project(fold, "thesis", "base", time.time())
    )
    assert not (Path(dirs["state_dir"]) / "slugs.json").exists(), "an install from before"
    before = files_under(their_workspace)

    await start_in_picker(h, twin, "thesis")
    assert workspace_of(h.container(twin, "thesis")) != their_workspace
    assert files_under(their_workspace) == before

    cookies = await h.app.login_user(fold)
    page = (await get_page(f"spawn/{fold}", h.app, cookies=cookies)).text
    assert listed(page, "thesis"), "h.baker's project is still theirs"
    await h.start(fold, options={"project": "thesis"})
    assert workspace_of(h.container(fold, "thesis")) == their_workspace
    assert (their_workspace / "notes.txt").read_text() == "h.baker's work"


async def test_a_record_naming_another_owner_is_neither_listed_nor_created_over(hub, dirs):
    """Under a user's slug, a record of someone else's (a slug once shared, or forged)."""
    h = await hub()
    user, other = h.new_user(), h.new_user()
    cookies = await h.app.login_user(user)
    assert (await get_page(f"spawn/{user}", h.app, cookies=cookies)).status_code == 200
    slug = natural_slug(user)  # what the picker just registered: a fresh plain name keeps it
    store = ProjectStore(dirs["state_dir"])
    store.save(slug, Project(other, "thesis", "base", time.time()))

    page = (await get_page(f"spawn/{user}", h.app, cookies=cookies)).text
    assert not listed(page, "thesis")
    r = await h.request_start(user, options={"project": "thesis", "type": "base"})
    assert r.status_code == 409, r.text
    assert "another user's project" in r.json()["message"]
    assert "ask an admin" in r.json()["message"]
    assert not (Path(dirs["workspace_root"]) / slug).exists(), "nothing created"
    assert store.get(slug, "thesis").owner == other, "the record is kept"

"""A lab moving from DockerSpawner keeps its config: what ds01 honours, and what it refuses
with a reason (in the style of DockerSpawner's own tests, through a real hub and engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jupyterhub import orm
from jupyterhub.tests.utils import api_request
from traitlets import TraitError
from traitlets.config import Config

from ds01_spawner import DS01Spawner, labels
from ds01_spawner.identity import user_slug


def test_remove_false_is_refused_with_the_reason_not_half_honoured():
    for section in ("DockerSpawner", "DS01Spawner"):
        with pytest.raises(TraitError, match="remove=False cannot apply"):
            DS01Spawner(config=Config({section: {"remove": False}}))
    assert DS01Spawner(config=Config({"DockerSpawner": {"remove": True}})).remove is True


async def test_an_admins_own_option_keys_reach_their_hook_and_the_stored_options(hub):
    seen = {}

    def pre_spawn_hook(spawner):
        seen["cost_center"] = spawner.user_options.get("cost_center")

    h = await hub(allowed_user_options=["cost_center"], pre_spawn_hook=pre_spawn_hook)
    user = h.new_user()
    await h.start(user, options={"project": "paper", "cost_center": "ml-42"})
    assert seen == {"cost_center": "ml-42"}
    stored = h.app.users[user].spawners[""].orm_spawner.user_options
    assert stored["cost_center"] == "ml-42" and stored["project"] == "paper"

    other = h.new_user()
    r = await h.request_start(other, options={"project": "paper", "budget": "x"})
    assert r.status_code == 400 and "allowed_user_options" in r.json()["message"], r.text
    assert h.containers(other) == []


async def test_an_admins_own_apply_user_options_does_not_bypass_ds01s_checks(hub):
    applied = []
    h = await hub(apply_user_options=lambda spawner, options: applied.append(dict(options)))
    user = h.new_user()
    await h.start(user, options={"project": "own-hook"})
    assert applied and h.container(user, "own-hook") is not None
    r = await h.request_start(user, "bad", options={"project": "bad", "gpus": "²"})
    s = (await api_request(h.app, "users", user)).json()["servers"].get("bad")
    assert r.status_code >= 400 or not (s and s["ready"]), "start() validated the options"
    assert h.containers(user, **{labels.PROJECT: "bad"}) == []


async def test_pull_policy_always_never_pulls_a_project_image(hub):
    """A registry may hold a stranger's image named ds01-<user>/<project>: never pulled.
    The base image is pulled by the policy before a build; here no registry answers,
    so the build goes on with the local copy."""
    h = await hub(pull_policy="always")
    user = h.new_user()
    await h.start(user, options={"project": "pulled"})
    await h.stop(user)
    await h.start(user, options={"project": "pulled"})  # the image exists now: no build
    image = h.engine.images.get(f"ds01-{user_slug(user)}/pulled:latest")
    assert image.labels[labels.USER] == user, "the project image is the one built here"


@pytest.mark.parametrize("legacy, suggested", [("My_Project", "my-project"), ("run@2", "run-2")])
async def test_a_server_named_before_ds01_is_refused_with_the_name_to_use(
    hub, dirs, legacy, suggested
):
    h = await hub()
    user = h.new_user()
    # a server made before the hub's name rules tightened: JupyterHub 6 still starts it
    h.app.db.add(orm.Spawner(user=h.app.users[user].orm_user, name=legacy))
    h.app.db.commit()
    r = await h.request_start(user, legacy)
    assert r.status_code == 400, r.text
    message = r.json()["message"]
    assert f"Start a server named {suggested!r} instead" in message, message
    assert h.containers(user) == []
    root = Path(dirs["workspace_root"])
    assert not root.exists() or not any(root.iterdir()), "no workspace was made"
    stored = h.app.users[user].spawners[legacy].orm_spawner.user_options
    assert not stored, json.dumps(stored)

"""The repo's own hub serves ds01's projects home at /hub/home (its template override is
active), and the ds01 service answers the home's data for the signed-in user only."""

from __future__ import annotations

import requests

from ds01_spawner.projects import Project, ProjectStore


def user_token(hub, name: str) -> str:
    r = hub.api("POST", f"users/{name}/tokens", json={"note": "home test", "expires_in": 600})
    r.raise_for_status()
    return r.json()["token"]


def test_the_hubs_home_page_is_the_projects_home(hub_process):
    hub = hub_process()
    hub.start()
    session = hub.login("alice")
    page = session.get(f"{hub.url}/hub/home", timeout=30)
    assert page.status_code == 200
    assert 'id="ds01-home"' in page.text
    assert 'data-service="/services/ds01/"' in page.text
    assert "Your projects" in page.text
    # the hub's own default server and named servers stay, below
    assert 'id="start"' in page.text and "Named Servers" in page.text
    # without the script: where the projects are
    assert 'href="/services/ds01/"' in page.text


def test_the_home_data_are_the_users_own_and_an_admins_for_anyone(hub_process):
    hub = hub_process()
    hub.start()
    hub.api("POST", "users/alice")
    service = f"{hub.url}/services/ds01/api/home"
    alice = {"Authorization": f"token {user_token(hub, 'alice')}"}
    mine = requests.get(service, headers=alice, timeout=30)
    assert mine.status_code == 200, mine.text
    data = mine.json()
    assert (data["user"], data["projects"], data["more"]) == ("alice", [], 0)
    assert "base" in [t["name"] for t in data["types"]]

    other = requests.get(f"{service}/admin", headers=alice, timeout=30)
    assert other.status_code == 403 and other.json()["status"] == 403

    admin = {"Authorization": f"token {hub.admin_token()}"}
    theirs = requests.get(f"{service}/alice", headers=admin, timeout=30)
    assert theirs.status_code == 200 and theirs.json()["user"] == "alice"


def test_a_recorded_project_is_on_the_home_and_in_the_image_lists_status(hub_process):
    hub = hub_process()
    hub.start()
    hub.api("POST", "users/alice")
    store = ProjectStore(hub.data_dir / "state")
    store.save(store.slug("alice"), Project("alice", "notes", "base", 0.0))
    alice = {"Authorization": f"token {user_token(hub, 'alice')}"}
    home = requests.get(f"{hub.url}/services/ds01/api/home", headers=alice, timeout=30).json()
    (row,) = home["projects"]
    assert (row["project"], row["state"], row["can_start"]) == ("notes", "stopped", True)
    assert row["image"]["built_at"] is None
    images = requests.get(f"{hub.url}/services/ds01/api/images", headers=alice, timeout=30)
    (listed,) = images.json()["projects"]
    assert listed["status"]["label"] == "stopped"

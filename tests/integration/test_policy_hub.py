"""The lab policy with the repo's jupyterhub_config.py in a real hub process: a broken
policy stops the hub at start; the ds01 service retires by policy out of the box (its
warnings and the retirement in the workspace's `.ds01-alerts`) and serves "check
limits"."""

from __future__ import annotations

import time

import pytest
import requests

from .hubprocess import HubProcess, remove_user_objects

USER = "retiree"


@pytest.fixture
def data(tmp_path, engine):
    (tmp_path / "data").mkdir()
    yield tmp_path
    remove_user_objects(engine, USER)


def test_a_broken_policy_file_stops_the_hub_naming_file_line_and_key(data):
    policy = data / "policy.yaml"
    policy.write_text("defaults:\n  memory: 16G\n  idle_timeout: 30\n")
    hub = HubProcess(data / "data", data / "hub.log", DS01_POLICY_FILE=str(policy))
    with pytest.raises(RuntimeError, match="hub exited 1"):
        hub.start()
    log = (data / "hub.log").read_text()
    assert "the lab policy is invalid; the hub does not start" in log
    assert f"{policy}, line 3, key defaults.idle_timeout: 30 is not a duration" in log


def test_the_service_retires_by_policy_and_shows_limits(data):
    policy = data / "policy.yaml"
    policy.write_text(
        "defaults:\n  max_runtime: 12s\n  max_running_projects: 2\n"
        "retirement:\n  check_interval: 1s\n  warn_before: 10s\n"
    )
    hub = HubProcess(
        data / "data", data / "hub.log", DS01_POLICY_FILE=str(policy), DS01_SIMULATED_GPUS="2"
    )
    hub.start()
    try:
        hub.api("POST", f"users/{USER}")
        token = hub.api("POST", f"users/{USER}/tokens", json={"note": "t"}).json()["token"]
        mine = {"Authorization": f"token {token}"}
        service = f"{hub.url}/services/ds01/api/"
        options = {"user_options": {"gpus": 1}}
        assert hub.api("POST", f"users/{USER}/servers/p", json=options).status_code in (201, 202)
        hub.wait_ready(USER, "p")
        admin = {"Authorization": f"token {hub.admin_token()}"}
        gpus = requests.get(service + "limits?all=1", headers=admin, timeout=30).json()["gpus"]
        assert sorted((g["state"], g["user"], g["node"]) for g in gpus) == [
            ("free", "", ""),
            ("held", USER, ""),
        ]  # every GPU and who holds it

        limits = requests.get(service + "limits", headers=mine, timeout=30).json()
        (me,) = limits["users"]
        assert me["user"] == USER and me["usage"]["running_projects"] == 1
        assert me["limits"]["max_runtime"] == {"value": "12s", "source": "defaults"}
        assert me["servers"][0]["project"] == "p" and me["servers"][0]["runtime_left"]
        everyone = requests.get(service + "limits?all=1", headers=mine, timeout=30)
        assert everyone.status_code == 403, "everyone's limits are for admins"

        deadline = time.monotonic() + 90
        while hub.api("GET", f"users/{USER}").json()["servers"].get("p"):
            assert time.monotonic() < deadline, "not retired after max_runtime"
            time.sleep(1)
        log = (data / "hub.log").read_text()
        assert f"Retiring {USER}/p (server 'p') by policy, max_runtime" in log
        alerts = (data / "data" / "workspaces" / USER / "p" / ".ds01-alerts").read_text()
        levels = [line.split(" ")[1] for line in alerts.splitlines()]
        assert levels[-1] == "retired" and "max_runtime" in alerts.splitlines()[-1]
        assert 1 <= levels.count("warning") <= 3, (
            "warn_before (10s ahead), 75 % and 90 %: each once, over a dozen checks"
        )

        view = requests.get(service + "limits?all=1", headers=admin, timeout=30).json()
        assert [g["state"] for g in view["gpus"]] == ["free", "free"]  # freed at the retire
        assert view["policy"]["source"] == str(policy) and view["policy"]["error"] is None
        assert any(r["user"] == USER and r["reason"] == "max_runtime" for r in view["retirements"])
        page = requests.get(f"{hub.url}/services/ds01/limits?all=1", headers=admin, timeout=30)
        assert page.status_code == 200 and "Everyone's limits" in page.text
        assert "Reload policy now" in page.text and "it has run for" in page.text
        assert 'id="gpus"' in page.text and "No GPUs." not in page.text
        page = requests.get(f"{hub.url}/services/ds01/limits", headers=mine, timeout=30)
        assert "Your limits" in page.text and "No project running." in page.text
        assert "max_runtime" in page.text and "12s" in page.text

        policy.write_text("defaults:\n  max_runtime: soon\n")
        r = requests.post(service + "policy/reload", headers=admin, timeout=30)
        assert r.status_code == 400 and "key defaults.max_runtime" in r.json()["message"]
        view = requests.get(service + "limits?all=1", headers=admin, timeout=30).json()
        assert "line 2, key defaults.max_runtime" in view["policy"]["error"]
        assert view["policy"]["retirement"]["check_interval"] == "1s", "old policy in force"
    finally:
        hub.stop()

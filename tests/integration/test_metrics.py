"""The ds01 service's metrics in a real Prometheus (Debian's package): after a GPU spawn,
a PromQL query over Prometheus' HTTP API returns the allocation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from ds01_spawner import labels

from .conftest import eventually
from .hubprocess import HubProcess, free_port, remove_user_objects

METRICS_PATH = "/services/ds01/metrics"


@pytest.fixture
def hub(tmp_path, engine) -> Iterator[HubProcess]:
    (tmp_path / "data").mkdir()
    hub = HubProcess(tmp_path / "data", tmp_path / "hub.log", DS01_SIMULATED_GPUS="2")
    yield hub
    hub.stop()
    remove_user_objects(engine, "alice")


def scrape_config(target: str, path: str, token: str) -> dict:
    """Prometheus' config: scrape `path` on `target` every second with a hub token."""
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "ds01",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "metrics_path": path,
                "authorization": {"type": "token", "credentials": token},
                "static_configs": [{"targets": [target]}],
            }
        ],
    }


@pytest.fixture
def prometheus(tmp_path) -> Iterator[Callable[[dict], str]]:
    """Start Prometheus on a free port of 127.0.0.1 with a config; returns its URL.
    Always stopped, by its pid, when the test ends."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("DS01_REQUIRE_DOCKER") or os.environ.get("CI"):
            pytest.fail("prometheus is not installed: scripts/bootstrap installs it")
        pytest.skip("prometheus is not installed: run scripts/bootstrap")
    started: list[subprocess.Popen] = []

    def start(config: dict) -> str:
        path = tmp_path / "prometheus.yml"
        path.write_text(json.dumps(config))  # JSON is YAML
        port = free_port()
        with open(tmp_path / "prometheus.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        eventually(lambda: _ready(url, proc, tmp_path / "prometheus.log"), "prometheus", 30)
        return url

    yield start
    for proc in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _ready(url: str, proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"prometheus exited {proc.returncode}:\n{log.read_text()[-2000:]}")
    try:
        return requests.get(f"{url}/-/ready", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def query(prometheus_url: str, promql: str) -> list[dict]:
    r = requests.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def hub_token(hub: HubProcess, scopes: list[str]) -> str:
    r = hub.api(
        "POST",
        "users/admin/tokens",
        json={"scopes": scopes, "note": "metrics test", "expires_in": 600},
    )
    assert r.status_code == 201, r.text
    return r.json()["token"]


def start_on_a_gpu(hub: HubProcess, engine, user: str, server: str) -> dict[str, str]:
    """Start `user`'s server with one GPU; its container's labels."""
    hub.api("POST", f"users/{user}")
    r = hub.api(
        "POST", f"users/{user}/servers/{server}", data=json.dumps({"user_options": {"gpus": 1}})
    )
    assert r.status_code in (201, 202), r.text
    hub.wait_ready(user, server)
    (container,) = engine.containers.list(all=True, filters={"label": [f"{labels.USER}={user}"]})
    return container.labels


def test_prometheus_sees_the_gpu_a_spawn_allocated(hub, engine, prometheus):
    hub.start()
    held = start_on_a_gpu(hub, engine, "alice", "train")
    token = hub_token(hub, ["read:metrics", "access:services!service=ds01"])
    url = prometheus(scrape_config(f"127.0.0.1:{hub.port}", METRICS_PATH, token))

    def alices_gpus() -> dict[str, str]:
        return {
            r["metric"]["gpu"]: r["value"][1]
            for r in query(url, 'ds01_gpu_allocated{user="alice"}')
        }

    found = eventually(alices_gpus, "alice's GPU in Prometheus", 60)
    assert found == {held[labels.GPU_UUIDS]: "1"}
    free = query(url, 'ds01_gpus{state="free"}')
    assert [r["value"][1] for r in free] == ["1"]

    time.sleep(5)  # a few more scrapes: what one takes (pytest -s prints it)
    took = scrape_seconds(url, "5s")
    print(f"ds01 scrapes through the hub's proxy: {took}")
    assert [r["value"][1] for r in query(url, 'up{job="ds01"}')] == ["1"]
    assert took["max"] < 1.0  # the scrape timeout


def scrape_seconds(url: str, window: str) -> dict[str, float]:
    """The least, mean and most time Prometheus took to scrape ds01 over `window`."""
    took = {}
    for f in ("min", "avg", "max"):
        (result,) = query(url, f'{f}_over_time(scrape_duration_seconds{{job="ds01"}}[{window}])')
        took[f] = float(result["value"][1])
    return took


def test_a_token_without_read_metrics_is_refused(hub):
    hub.start()
    token = hub_token(hub, ["access:services!service=ds01"])

    r = requests.get(
        f"{hub.url}{METRICS_PATH}", headers={"Authorization": f"token {token}"}, timeout=30
    )

    assert r.status_code == 403 and "read:metrics" in r.text

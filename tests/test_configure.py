"""configure(c) fills in what the admin left unset, and hands the service the hub's final
c.DS01Spawner settings, whatever order the config file sets them in."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from jupyterhub import orm
from jupyterhub.roles import get_default_roles
from traitlets.config import Config, PyFileConfigLoader

from ds01_spawner import DS01Spawner
from ds01_spawner.configure import HUB_TEMPLATES, SERVICE_ACCESS, configure, server_token_scopes
from ds01_spawner.settings import SETTINGS_ENV, SHARED_SETTINGS, DS01Settings


def spawner_settings(environ: dict[str, str]) -> DS01Settings:
    """The settings as the ds01 service reads them from its environment."""
    return DS01Settings.from_environ(environ)


@pytest.fixture(autouse=True)
def no_engine(monkeypatch):
    """The bridge address without asking an engine."""
    module = sys.modules["ds01_spawner.configure"]  # the package exports configure() by this name
    monkeypatch.setattr(module, "docker_bridge_ip", lambda network: "10.9.8.7")


def service_environment(c: Config) -> dict[str, str]:
    """The ds01 service's environment, as the hub makes it when it starts the service."""
    (service,) = [s for s in c.JupyterHub.services if s["name"] == "ds01"]
    return {k: v(None) if callable(v) else v for k, v in service["environment"].items()}


def load_config_file(tmp_path: Path, text: str) -> Config:
    """Load a jupyterhub_config.py the way the hub does (traitlets' file loader)."""
    path = tmp_path / "jupyterhub_config.py"
    path.write_text(text)
    return PyFileConfigLoader(path.name, path=str(tmp_path)).load_config()


def test_simulated_gpus_the_admin_set_before_configure_is_kept():
    c = Config()
    c.DS01Spawner.simulated_gpus = 3
    configure(c, simulated_gpus=0)
    assert c.DS01Spawner.simulated_gpus == 3
    assert spawner_settings(service_environment(c)).simulated_gpus == 3


def test_simulated_gpus_argument_fills_in_when_unset():
    c = Config()
    configure(c, simulated_gpus=2)
    assert c.DS01Spawner.simulated_gpus == 2
    assert spawner_settings(service_environment(c)).simulated_gpus == 2


def test_hub_address_network_and_spawner_class_the_admin_set_are_kept():
    c = Config()
    c.JupyterHub.hub_ip = "0.0.0.0"
    c.JupyterHub.hub_connect_ip = "hub.lab.example"
    c.DockerSpawner.network_name = "labnet"
    c.JupyterHub.spawner_class = "mylab.LabSpawner"
    configure(c)
    assert c.JupyterHub.hub_ip == "0.0.0.0"
    assert c.JupyterHub.hub_connect_ip == "hub.lab.example"
    assert c.DockerSpawner.network_name == "labnet"
    assert c.JupyterHub.spawner_class == "mylab.LabSpawner"


def test_unset_hub_settings_are_filled_in():
    c = Config()
    configure(c)
    assert c.JupyterHub.spawner_class == "ds01"
    assert (c.JupyterHub.hub_ip, c.JupyterHub.hub_connect_ip) == ("10.9.8.7", "10.9.8.7")
    assert c.DockerSpawner.network_name == "bridge"


def test_the_admins_own_scope_description_is_kept():
    c = Config()
    c.JupyterHub.custom_scopes = {"custom:ds01:admin": {"description": "lab admins"}}
    configure(c)
    assert c.JupyterHub.custom_scopes["custom:ds01:admin"] == {"description": "lab admins"}


def test_the_projects_home_template_comes_after_the_admins_own_templates():
    c = Config()
    c.JupyterHub.template_paths = ["/srv/lab/templates"]
    configure(c)
    assert c.JupyterHub.template_paths == ["/srv/lab/templates", HUB_TEMPLATES]
    assert (Path(HUB_TEMPLATES) / "home.html").is_file()


def test_spawner_settings_set_after_configure_reach_the_service(tmp_path):
    c = load_config_file(
        tmp_path,
        "from ds01_spawner import configure\n"
        "c = get_config()\n"
        "configure(c)\n"
        "c.DS01Spawner.workspace_root = '/lab/workspaces'\n"
        "c.DS01Spawner.state_dir = '/lab/state'\n"
        "c.DS01Spawner.max_dockerfile_bytes = 4096\n",
    )
    settings = spawner_settings(service_environment(c))
    assert settings.workspace_root == "/lab/workspaces"
    assert settings.state_dir == "/lab/state"
    assert settings.max_dockerfile_bytes == 4096


def test_the_service_reads_what_the_admin_left_unset_as_the_hub_does():
    c = Config()
    configure(c)
    service, hub = spawner_settings(service_environment(c)), DS01Spawner(config=c)
    for name in SHARED_SETTINGS:
        assert getattr(service, name) == getattr(hub, name), name
    assert service.build_settings == hub.build_settings


def test_the_service_gets_no_copy_made_at_configure_time():
    c = Config()
    configure(c)
    c.DS01Spawner.build_args = {"PIP_INDEX_URL": "https://pypi.lab.example/simple"}
    assert '"PIP_INDEX_URL"' in service_environment(c)[SETTINGS_ENV]


def test_the_shared_settings_are_declared_once_and_the_spawner_inherits_them():
    own = {n for n, t in DS01Spawner.class_own_traits().items() if t.metadata.get("config")}
    assert not own & set(SHARED_SETTINGS), "a shared setting is declared again in the spawner"
    assert set(SHARED_SETTINGS) <= set(DS01Spawner.class_trait_names(config=True))
    for name in ("workspace_root", "state_dir", "max_dockerfile_bytes", "policy_file"):
        assert name in SHARED_SETTINGS


def test_a_setting_under_ds01settings_reaches_the_service_too():
    c = Config()
    configure(c)
    c.DS01Settings.max_dockerfile_bytes = 2048
    c.DS01Spawner.state_dir = "/lab/state"
    settings = spawner_settings(service_environment(c))
    assert (settings.max_dockerfile_bytes, settings.state_dir) == (2048, "/lab/state")
    assert DS01Spawner(config=c).max_dockerfile_bytes == 2048


def test_remove_false_stops_the_hub_at_start_with_the_reason():
    c = Config()
    c.DockerSpawner.remove = False
    with pytest.raises(SystemExit, match="remove=False cannot apply"):
        configure(c)


def test_an_admin_cannot_claim_ds01s_own_option_keys():
    c = Config()
    c.DS01Spawner.allowed_user_options = ["cost_center", "image"]
    with pytest.raises(SystemExit, match="may not name image"):
        configure(c)


def test_the_announcement_reads_the_state_dir_set_after_configure(tmp_path):
    c = Config()
    configure(c)
    c.DS01Spawner.state_dir = str(tmp_path)
    message = {"server": "", "project": "p", "reason": "idle", "at": 0, "message": "retiring soon"}
    (tmp_path / "notices.json").write_text(
        json.dumps({"written": 0, "warnings": {"alice": [message]}})
    )

    class User:
        name = "alice"

    assert "retiring soon" in c.JupyterHub.template_vars["announcement"](User())


# ---------------------------------------------------------------- the terminal commands' access


def server_role_scopes() -> list[str]:
    """JupyterHub's own `server` role: what a server's token may do unless told otherwise."""
    (role,) = [r for r in get_default_roles() if r["name"] == "server"]
    return role["scopes"]


def test_a_servers_token_gets_the_server_role_and_access_to_the_service():
    spawner = SimpleNamespace(user=SimpleNamespace(db=None))
    assert server_token_scopes(spawner) == [*server_role_scopes(), SERVICE_ACCESS]
    assert SERVICE_ACCESS == "access:services!service=ds01"


def test_the_server_role_is_read_as_this_hub_defines_it():
    db = orm.new_session_factory("sqlite://")()
    db.add(orm.Role(name="server", scopes=["users:activity!user", "read:users:name!user"]))
    db.commit()
    spawner = SimpleNamespace(user=SimpleNamespace(db=db))
    assert server_token_scopes(spawner) == [
        "users:activity!user",
        "read:users:name!user",
        SERVICE_ACCESS,
    ]


def test_the_service_access_scope_is_not_added_twice():
    db = orm.new_session_factory("sqlite://")()
    db.add(orm.Role(name="server", scopes=["users:activity!user", SERVICE_ACCESS]))
    db.commit()
    spawner = SimpleNamespace(user=SimpleNamespace(db=db))
    assert server_token_scopes(spawner).count(SERVICE_ACCESS) == 1


def test_every_ds01_server_token_reaches_the_service_by_default():
    c = Config()
    configure(c)
    assert "server_token_scopes" not in c.DS01Spawner, "configure leaves the setting to the admin"
    assert DS01Spawner(config=c).server_token_scopes is server_token_scopes


@pytest.mark.parametrize("section", ["DS01Spawner", "DockerSpawner", "Spawner"])
def test_the_admins_own_server_token_scopes_are_theirs(section):
    def scopes(spawner):
        return ["users:activity!user"]

    for value in (["users:activity!user", "read:users:name"], scopes):
        c = Config()
        c[section].server_token_scopes = value
        configure(c)
        assert DS01Spawner(config=c).server_token_scopes == value


def test_the_service_listens_where_containers_reach_the_hub():
    c = Config()
    c.JupyterHub.hub_ip = "0.0.0.0"
    c.JupyterHub.hub_connect_ip = "10.1.2.3"
    configure(c, service_port=10200)
    (service,) = [s for s in c.JupyterHub.services if s["name"] == "ds01"]
    assert service["url"] == "http://10.1.2.3:10200"
    assert c.DS01Spawner.service_url == "http://10.1.2.3:10200{base_url}services/ds01/"


def test_a_hub_on_every_interface_without_a_connect_ip_serves_on_the_bridge():
    c = Config()
    c.JupyterHub.hub_ip = "0.0.0.0"
    c.JupyterHub.hub_connect_ip = ""
    configure(c)
    assert c.DS01Spawner.service_url == "http://10.9.8.7:10101{base_url}services/ds01/"


def test_the_service_url_the_admin_set_is_kept():
    c = Config()
    c.JupyterHub.hub_ip = c.JupyterHub.hub_connect_ip = "10.1.2.3"
    c.DS01Spawner.service_url = "http://ds01.lab.example{base_url}services/ds01/"
    configure(c)
    assert c.DS01Spawner.service_url == "http://ds01.lab.example{base_url}services/ds01/"


def test_a_service_ip_given_to_configure_wins_over_the_hubs_address():
    c = Config()
    c.JupyterHub.hub_ip = c.JupyterHub.hub_connect_ip = "10.1.2.3"
    configure(c, service_ip="10.5.5.5")
    assert c.DS01Spawner.service_url.startswith("http://10.5.5.5:10101{base_url}")


@pytest.mark.parametrize(
    "spawner_class", ["ds01-swarm", "ds01_spawner.swarmspawner.DS01SwarmSpawner", "class"]
)
def test_on_a_swarm_the_service_reads_the_swarms_gpus_with_the_spawners_settings(
    spawner_class, tmp_path
):
    from ds01_spawner.swarmallocator import SwarmGpus
    from ds01_spawner.swarmspawner import DS01SwarmSpawner

    c = Config()
    c.JupyterHub.spawner_class = DS01SwarmSpawner if spawner_class == "class" else spawner_class
    configure(c)
    c.DS01Spawner.state_dir = str(tmp_path)
    c.DS01SwarmSpawner.max_dockerfile_bytes = 3072
    c.DS01SwarmSpawner.swarm_gpu_kind = "LAB-GPU"
    settings = spawner_settings(service_environment(c))
    assert (settings.swarm_gpu_kind, settings.max_dockerfile_bytes) == ("LAB-GPU", 3072)
    assert settings.state_dir == str(tmp_path)
    allocator = settings.gpu_allocator
    assert isinstance(allocator, SwarmGpus) and allocator.kind == "LAB-GPU"
    hub = DS01SwarmSpawner(config=c)
    assert isinstance(hub.gpu_allocator, SwarmGpus) and hub.gpu_allocator is allocator


def test_on_one_engine_the_service_is_told_of_no_swarm(tmp_path):
    c = Config()
    configure(c)
    c.DS01Spawner.state_dir = str(tmp_path)
    environ = service_environment(c)
    assert "swarm_gpu_kind" not in json.loads(environ[SETTINGS_ENV])
    assert spawner_settings(environ).swarm_gpu_kind == ""  # the engine's allocator, NVML


def test_the_service_talks_to_the_hubs_engine(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/ds01-swarm/n1/docker.sock")
    monkeypatch.delenv("DOCKER_CERT_PATH", raising=False)
    c = Config()
    configure(c)
    env = service_environment(c)
    assert env["DOCKER_HOST"] == "unix:///run/ds01-swarm/n1/docker.sock"
    assert "DOCKER_CERT_PATH" not in env

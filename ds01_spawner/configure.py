"""`configure(c)`: the hub settings ds01 needs, for an admin's own jupyterhub_config.py."""

from __future__ import annotations

import copy
import html
import ipaddress
import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import docker
import docker.errors
from jupyterhub import orm

from .compat import config_problems
from .engine import docker_client
from .limits import load_policy
from .policyfile import PolicyError
from .projects import discover_types
from .retirement import Notices
from .settings import SETTINGS_ENV, SHARED_SETTINGS, SWARM_GPU_KIND, DS01Settings
from .swarmservice import GPU_KIND

ADMIN_SCOPE = "custom:ds01:admin"
# what the ds01 service's own token may do: restart servers on a rebuilt image,
# and retire them by policy (read who runs what since when, and in which groups)
SERVICE_SCOPES = ["servers", "list:users", "read:users:activity", "read:users:groups"]
SERVICE_ACCESS = "access:services!service=ds01"
DOCKER_ENV = ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")  # where the engine is
# who may scrape /services/ds01/metrics: give a Prometheus service's token this role
METRICS_ROLE = {
    "name": "ds01-metrics",
    "description": "scrape the ds01 service's Prometheus metrics",
    "scopes": ["read:metrics", SERVICE_ACCESS],
}
# JupyterHub's `server` role: what a server's token may do unless told otherwise
SERVER_ROLE_SCOPES = ["users:activity!user", "access:servers!server"]
# ds01's overrides of the hub's pages: home.html lists the user's projects
HUB_TEMPLATES = str(Path(__file__).resolve().parent / "templates" / "hub")


def docker_bridge_ip(network: str = "bridge", fallback: str = "172.17.0.1") -> str:
    """The host's address on a Docker network: where containers reach the hub."""
    try:
        client = docker_client(5)
        try:
            config = client.inspect_network(network)["IPAM"]["Config"]
        finally:
            client.close()
    except (docker.errors.DockerException, KeyError):
        return fallback
    for entry in config or []:
        if entry.get("Gateway"):
            return entry["Gateway"]
        if entry.get("Subnet"):
            # the default bridge reports no Gateway; Docker uses the subnet's first address
            network = ipaddress.ip_network(entry["Subnet"], strict=False)
            if network.version == 4:
                return str(next(network.hosts()))
    return fallback


def configure(
    c: Any,
    *,
    admin_users: Iterable[str] = (),
    simulated_gpus: int | None = None,
    network: str = "bridge",
    service_port: int = 10101,
    service_ip: str = "",
) -> None:
    """Use DS01Spawner, reach the hub from its containers, and run the ds01 service.

    - the hub listens on the Docker network's gateway address only (not on every
      interface), and single-user servers connect to it there;
    - the ``ds01`` managed service runs at /services/ds01/, listed in the hub's
      Services menu; every user may sign in to it, and `admin_users` get the
      ``custom:ds01:admin`` scope for its admin views (grant the ``ds01-admin``
      role to more users or groups in your own load_roles), and may scrape its
      metrics, as may the ``ds01-metrics`` role (list your Prometheus service in
      a role of that name in your load_roles: ds01 fills in its scopes);
    - `simulated_gpus` > 0 presents that many pretend GPUs, to spawner and service;
    - the service listens on `service_ip` (default: where containers reach the hub),
      so the terminal commands in every server reach it, with the server's own
      token (whose scopes `server_token_scopes` gives access to the service);
    - the hub's home page lists the user's projects: ds01's ``home.html`` comes
      after your own ``c.JupyterHub.template_paths`` (set them before the call),
      so a ``home.html`` of yours still wins.

    It only fills in what you left unset: your own ``c.JupyterHub.hub_ip``,
    ``c.DockerSpawner.network_name``, ``c.DS01Spawner.simulated_gpus`` (...)
    win over its defaults and arguments. Your ``c.DS01Spawner`` settings may
    come before or after the call: the service is handed the hub's final
    values of `SHARED_SETTINGS` when the hub starts it. The policy is checked
    here, so a broken policy file stops the hub at start, naming file, line
    and key.
    """
    check_config(c)
    check_policy(c)
    network = _get(c.DS01Spawner, "network_name", None) or _get(
        c.DockerSpawner, "network_name", network
    )
    _fill(c.JupyterHub, "spawner_class", "ds01")
    _fill(c.DockerSpawner, "network_name", network)
    if simulated_gpus is not None:
        _fill(c.DS01Spawner, "simulated_gpus", simulated_gpus)
    if "hub_ip" not in c.JupyterHub or "hub_connect_ip" not in c.JupyterHub:
        ip = docker_bridge_ip(network)
        _fill(c.JupyterHub, "hub_ip", ip)
        _fill(c.JupyterHub, "hub_connect_ip", ip)
    # the service listens where containers reach the hub: the terminal commands call it
    service_host = service_ip or _reachable_ip(c, network)
    if ":" in service_host:  # IPv6
        service_host = f"[{service_host}]"
    service_origin = f"http://{service_host}:{service_port}"
    _fill(c.DS01Spawner, "service_url", service_origin + "{base_url}services/ds01/")

    c.JupyterHub.custom_scopes = {
        ADMIN_SCOPE: {"description": "See and manage every user's ds01 projects, images and GPUs."},
        **_get(c.JupyterHub, "custom_scopes", {}),
    }
    c.JupyterHub.services = [
        *_get(c.JupyterHub, "services", []),
        {
            "name": "ds01",
            "display": True,
            "info": {"description": "ds01: project images, limits and GPUs"},
            "url": service_origin,
            "command": [sys.executable, "-m", "ds01_spawner.service"],
            # a callable: the hub calls it when it starts the service, after the
            # whole config (and the command line) was read
            "environment": {
                SETTINGS_ENV: lambda _spawner: json.dumps(shared_settings(c)),
                # the hub's engine (a swarm manager may be remote): the hub's services
                # get only the environment they are given
                **{k: os.environ[k] for k in DOCKER_ENV if k in os.environ},
            },
            "oauth_no_confirm": True,
            # what a user's token for the service may carry: access, and the admin scope
            "oauth_client_allowed_scopes": [ADMIN_SCOPE],
        },
    ]
    c.JupyterHub.load_roles = [
        *with_metrics_role(_get(c.JupyterHub, "load_roles", [])),
        # everyone may sign in to the service (its pages check finer rights)
        {"name": "user", "scopes": ["self", SERVICE_ACCESS]},
        # the service itself: restarts on a rebuilt image, retirement by policy
        {
            "name": "ds01-service",
            "description": "the ds01 service restarts servers and retires them by policy",
            "scopes": SERVICE_SCOPES,
            "services": ["ds01"],
        },
        {
            "name": "ds01-admin",
            "description": "ds01 admin views: every user's GPUs and images",
            "scopes": [ADMIN_SCOPE, SERVICE_ACCESS, "read:metrics"],
            "users": sorted(admin_users),
        },
    ]

    c.JupyterHub.template_paths = with_hub_templates(_get(c.JupyterHub, "template_paths", []))
    # retirement warnings and recent retirements, on every hub page of the user
    c.JupyterHub.template_vars = {
        **_get(c.JupyterHub, "template_vars", {}),
        "announcement": retirement_notices(
            lambda: spawner_setting(c, "state_dir"),
            _get(c.JupyterHub, "template_vars", {}).get("announcement", ""),
        ),
    }


def with_hub_templates(paths: Iterable[str]) -> list[str]:
    """The admin's template paths, then ds01's: the hub takes a page from the first path
    that has it, so an admin's own home.html still wins over ds01's projects home."""
    paths = list(paths)
    return paths if HUB_TEMPLATES in paths else [*paths, HUB_TEMPLATES]


def with_metrics_role(roles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The admin's roles and ``ds01-metrics``: theirs of that name (which lists who may
    scrape) with its description and scopes filled in where unset, else ours, empty."""
    name = METRICS_ROLE["name"]
    ours = [] if any(r.get("name") == name for r in roles) else [{"name": name}]
    return [
        {**copy.deepcopy(METRICS_ROLE), **r} if r.get("name") == name else r
        for r in [*roles, *ours]
    ]


def _reachable_ip(c: Any, network: str) -> str:
    """The hub's address as containers reach it: an IP address it listens on, else the
    Docker network's gateway (a wildcard bind or a host name is no place to listen)."""
    for name in ("hub_connect_ip", "hub_ip"):
        ip = _get(c.JupyterHub, name, "")
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            continue
        if not address.is_unspecified:
            return ip
    return docker_bridge_ip(network)


def server_token_scopes(spawner: Any) -> list[str]:
    """What a server's $JUPYTERHUB_API_TOKEN may do (DS01Spawner's default): the hub's
    ``server`` role, as this hub defines it, and access to the ds01 service.

    The hub gives a token only the scopes its user holds, so a token taken from
    a server does no more than its user could; the admin scope is not asked
    for, so an admin's terminal acts on the admin's own projects. Called at
    each start (JupyterHub accepts a callable), so it sees the final config.
    """
    db = getattr(getattr(spawner, "user", None), "db", None)
    role = orm.Role.find(db, "server") if db is not None else None
    scopes = list(role.scopes) if role is not None else list(SERVER_ROLE_SCOPES)
    return scopes if SERVICE_ACCESS in scopes else [*scopes, SERVICE_ACCESS]


def check_config(c: Any) -> None:
    """Stop the hub (SystemExit) on DockerSpawner settings ds01 cannot honour."""
    problems = config_problems(c)
    if problems:
        lines = "\n  ".join(problems)
        raise SystemExit(
            f"ds01: the spawner's settings cannot apply; the hub does not start.\n  {lines}"
        )


def check_policy(c: Any) -> None:
    """Stop the hub (SystemExit) on a policy it could not enforce."""
    spawner = c.DS01Spawner
    types_dir = _get(spawner, "project_types_dir", None)
    try:
        known = list(discover_types(types_dir)) or None if types_dir else None
    except OSError:
        known = None
    try:
        load_policy(_get(spawner, "policy_file", ""), _get(spawner, "policy", {}), known)
    except PolicyError as e:
        message = f"ds01: the lab policy is invalid; the hub does not start.\n  {e}"
        raise SystemExit(message) from None


def retirement_notices(state_dir: str | Callable[[], str], announcement: Any = ""):
    """The hub's announcement, per user: coming and recent retirements of their servers.

    `state_dir` may be a callable, asked on every page: the admin may set it
    after configure(c).
    """

    def render(user: Any) -> str:
        static = announcement(user) if callable(announcement) else announcement
        lines = [static] if static else []
        if user is not None:
            notices = Notices(state_dir() if callable(state_dir) else state_dir)
            lines += [html.escape(n["message"]) for n in notices.warnings(user.name)]
        return "<br>".join(lines)

    return render


def shared_settings(c: Any) -> dict[str, Any]:
    """The `SHARED_SETTINGS` an admin set, from the hub's final config where the hub runs.

    In a running hub that is JupyterHub's own config (the file, every line of
    it, and the command line); else `c`. Unset names are left out: the service
    gets DS01Spawner's defaults for them, as the hub does.
    """
    hub = sys.modules.get("jupyterhub.app")
    if hub is not None and hub.JupyterHub.initialized():
        c = hub.JupyterHub.instance().config
    given = {**(c.get("DS01Settings") or {}), **(c.get("DS01Spawner") or {})}
    found = {name: given[name] for name in SHARED_SETTINGS if name in given}
    if is_swarm_spawner(_get(c.JupyterHub, "spawner_class", "")):
        swarm = {**given, **(c.get("DS01SwarmSpawner") or {})}
        found.update({name: swarm[name] for name in SHARED_SETTINGS if name in swarm})
        found[SWARM_GPU_KIND] = swarm.get("swarm_gpu_kind") or GPU_KIND
    return found


def is_swarm_spawner(spawner_class: Any) -> bool:
    """The hub runs `ds01-swarm` (by entry point, dotted name or class)."""
    if isinstance(spawner_class, str):
        return spawner_class == "ds01-swarm" or spawner_class.endswith(".DS01SwarmSpawner")
    return any(k.__name__ == "DS01SwarmSpawner" for k in getattr(spawner_class, "__mro__", ()))


def spawner_setting(c: Any, name: str) -> Any:
    """One of the hub's final DS01Spawner settings, its default where the admin set none."""
    return shared_settings(c).get(name, DS01Settings.class_traits()[name].default())


def _fill(section: Any, name: str, value: Any) -> None:
    """Set `name` only where the admin has not: a helper never overrides the admin."""
    if name not in section:
        section[name] = value


def _get(section: Any, name: str, fallback: Any) -> Any:
    """A config value if it was set, else `fallback` (config sections return empty stand-ins)."""
    return section.get(name, fallback)

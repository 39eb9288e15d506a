"""`configure(c)`: the hub settings ds01 needs, for an admin's own jupyterhub_config.py."""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterable
from typing import Any

import docker
import docker.errors

ADMIN_SCOPE = "custom:ds01:admin"


def docker_bridge_ip(network: str = "bridge", fallback: str = "172.17.0.1") -> str:
    """The host's address on a Docker network: where containers reach the hub."""
    try:
        client = docker.from_env(timeout=5)
        try:
            config = client.networks.get(network).attrs["IPAM"]["Config"]
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
    simulated_gpus: int = 0,
    network: str = "bridge",
    service_port: int = 10101,
) -> None:
    """Use DS01Spawner, reach the hub from its containers, and run the ds01 service.

    - the hub listens on the Docker network's gateway address only (not on every
      interface), and single-user servers connect to it there;
    - the ``ds01`` managed service runs at /services/ds01/, listed in the hub's
      Services menu; every user may sign in to it, and `admin_users` get the
      ``custom:ds01:admin`` scope for its admin views (grant the ``ds01-admin``
      role to more users or groups in your own load_roles);
    - `simulated_gpus` > 0 presents that many pretend GPUs, to spawner and service.

    Call it after your own ``c.DS01Spawner`` settings: the service is given the
    same workspace, state and build settings.
    """
    ip = docker_bridge_ip(network)
    c.JupyterHub.spawner_class = "ds01"
    c.JupyterHub.hub_ip = ip
    c.JupyterHub.hub_connect_ip = ip
    c.DockerSpawner.network_name = network
    c.DS01Spawner.simulated_gpus = simulated_gpus

    c.JupyterHub.custom_scopes = {
        **_get(c.JupyterHub, "custom_scopes", {}),
        ADMIN_SCOPE: {"description": "See and manage every user's ds01 projects, images and GPUs."},
    }
    c.JupyterHub.services = [
        *_get(c.JupyterHub, "services", []),
        {
            "name": "ds01",
            "display": True,
            "info": {"description": "ds01: GPUs, and soon your project images"},
            "url": f"http://127.0.0.1:{service_port}",
            "command": [sys.executable, "-m", "ds01_spawner.service"],
            "environment": {
                "DS01_SIMULATED_GPUS": str(simulated_gpus),
                "DS01_SERVICE_SETTINGS": json.dumps(_shared_settings(c)),
            },
            "oauth_no_confirm": True,
            # what a user's token for the service may carry: access, and the admin scope
            "oauth_client_allowed_scopes": [ADMIN_SCOPE],
        },
    ]
    c.JupyterHub.load_roles = [
        *_get(c.JupyterHub, "load_roles", []),
        # everyone may sign in to the service (its pages check finer rights)
        {"name": "user", "scopes": ["self", "access:services!service=ds01"]},
        # the service itself: stop and start servers for "restart into new image"
        {
            "name": "ds01-service",
            "description": "the ds01 service restarts servers on a rebuilt image",
            "scopes": ["servers", "read:servers"],
            "services": ["ds01"],
        },
        {
            "name": "ds01-admin",
            "description": "ds01 admin views: every user's GPUs and images",
            "scopes": [ADMIN_SCOPE, "access:services!service=ds01"],
            "users": sorted(admin_users),
        },
    ]


_SHARED = (
    "workspace_root",
    "workspace_template",
    "state_dir",
    "base_image",
    "build_network_mode",
    "max_concurrent_builds",
    "build_timeout",
    "build_args",
)


def _shared_settings(c: Any) -> dict[str, Any]:
    """The DS01Spawner settings the service must agree on (it reads them as DS01Service's)."""
    spawner = c.DS01Spawner
    return {name: spawner[name] for name in _SHARED if name in spawner}


def _get(section: Any, name: str, fallback: Any) -> Any:
    """A config value if it was set, else `fallback` (config sections return empty stand-ins)."""
    return section.get(name, fallback)

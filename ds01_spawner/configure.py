"""`configure(c)`: the hub settings ds01 needs, for an admin's own jupyterhub_config.py."""

from __future__ import annotations

import ipaddress
from typing import Any

import docker
import docker.errors


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


def configure(c: Any, *, network: str = "bridge") -> None:
    """Use DS01Spawner and make the hub API reachable from its containers.

    The hub listens on the Docker network's gateway address only (not on every
    interface), and single-user servers connect to it there.
    """
    ip = docker_bridge_ip(network)
    c.JupyterHub.spawner_class = "ds01"
    c.JupyterHub.hub_ip = ip
    c.JupyterHub.hub_connect_ip = ip
    c.DockerSpawner.network_name = network

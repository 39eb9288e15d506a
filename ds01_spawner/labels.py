"""The ``ds01.*`` labels: the engine-side record of everything ds01 made.

Images and containers carry these labels so the plugin's objects can be found,
listed and reconciled from the Docker engine alone (no side database to drift).
Names are chosen once; renaming them would orphan existing objects.
"""

from __future__ import annotations

import time

MANAGED = "ds01.managed"
ROLE = "ds01.role"  # "base" (images/build) or "project"
USER = "ds01.user"
PROJECT = "ds01.project"
TYPE = "ds01.type"
SERVER_NAME = "ds01.server_name"
IMAGE = "ds01.image"
UID = "ds01.uid"
STARTED_AT = "ds01.started_at"
MAX_RUNTIME = "ds01.max_runtime"  # seconds, the policy's at the start ("": none); for display
DOCKERFILE_SHA256 = "ds01.dockerfile_sha256"
# the GPU ledger: what a container holds, written when it is created
GPU_UUIDS = "ds01.gpu.uuids"
GPU_INDICES = "ds01.gpu.indices"
GPU_EQUIVALENTS = "ds01.gpu.equivalents"
GPU_ALLOCATED_AT = "ds01.gpu.allocated_at"
# HMAC of the container's name and labels, with a key only the hub side holds:
# the ledger counts a container only if the spawner sealed it (see ledger.LedgerSeal)
GPU_SEAL = "ds01.gpu.seal"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def project_labels(username: str, project: str, project_type: str) -> dict[str, str]:
    """Labels shared by a project's image and its containers."""
    return {
        MANAGED: "true",
        ROLE: "project",
        USER: username,
        PROJECT: project,
        TYPE: project_type,
    }


def managed_filter(username: str | None = None) -> dict[str, list[str]]:
    """A docker ``filters`` argument selecting ds01 objects (of one user)."""
    wanted = [f"{MANAGED}=true"]
    if username is not None:
        wanted.append(f"{USER}={username}")
    return {"label": wanted}

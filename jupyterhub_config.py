"""A ds01 hub that runs as-is on one machine: `scripts/start-hub`.

Embedded defaults: SQLite, local images (built by `images/build`), and a
TRY-IT-OUT authenticator. Everything lives under $DS01_DATA_DIR (/srv/ds01).

Environment knobs:
  DS01_DATA_DIR         workspaces, hub state, SQLite database  (/srv/ds01)
  DS01_BIND_URL         where the hub is served                 (http://127.0.0.1:8000)
  DS01_ADMIN_USERS      comma-separated admin users             (admin)
  DS01_SHARED_PASSWORD  if set, everyone logs in with this password (8+ chars)
  DS01_SIMULATED_GPUS   present N simulated GPUs instead of reading NVML   (0)
  DS01_PIP_INDEX_URL    a lab package mirror for image builds             (unset: PyPI)
  DS01_BUILD_NETWORK    network mode of image builds, e.g. host           (unset: default)
  DS01_POLICY_FILE      the lab policy: limits, idle and runtime retirement  (./policy.yaml)

Several GPU servers on a Docker Swarm (README "Outgrowing one server"):
  DS01_SWARM_REGISTRY   set: spawn with `ds01-swarm`, images pushed here (host:port)
  DS01_HUB_IP           the address every node reaches the hub at (unset: the bridge)
  DS01_BASE_IMAGE       the base image, e.g. by digest in the registry (ds01/singleuser:latest)
  DOCKER_HOST           the engine of a swarm manager, if not this machine's
"""

import os
from pathlib import Path

from ds01_spawner import configure

c = get_config()  # noqa: F821

here = Path(__file__).resolve().parent
data = Path(os.environ.get("DS01_DATA_DIR", "/srv/ds01"))
data.mkdir(parents=True, exist_ok=True)

c.JupyterHub.bind_url = os.environ.get("DS01_BIND_URL", "http://127.0.0.1:8000")
c.JupyterHub.db_url = f"sqlite:///{data / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(data / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(data / "jupyterhub-proxy.pid")
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = 5

# --- Authentication: FOR TRYING IT ON ONE MACHINE ONLY -------------------------
# DummyAuthenticator lets anyone in with any password; that is why the hub
# listens on 127.0.0.1 by default. On a real server use your lab's login, e.g.
#   c.JupyterHub.authenticator_class = "ldapauthenticator.LDAPAuthenticator"
#   c.JupyterHub.authenticator_class = "oauthenticator.generic.GenericOAuthenticator"
#   c.JupyterHub.authenticator_class = "pam"   (host accounts; uids then match)
if os.environ.get("DS01_SHARED_PASSWORD"):
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = os.environ["DS01_SHARED_PASSWORD"]
    c.SharedPasswordAuthenticator.allow_all = True
else:
    c.JupyterHub.authenticator_class = "dummy"
admins = {u.strip() for u in os.environ.get("DS01_ADMIN_USERS", "admin").split(",") if u.strip()}
c.Authenticator.admin_users = admins

# --- ds01 ----------------------------------------------------------------------
c.DS01Spawner.workspace_root = str(data / "workspaces")
c.DS01Spawner.state_dir = str(data / "state")
c.DS01Spawner.project_types_dir = str(here / "images" / "types")
c.DS01Spawner.base_image = os.environ.get("DS01_BASE_IMAGE", "ds01/singleuser:latest")
if os.environ.get("DS01_PIP_INDEX_URL"):
    c.DS01Spawner.build_args = {"PIP_INDEX_URL": os.environ["DS01_PIP_INDEX_URL"]}
if os.environ.get("DS01_BUILD_NETWORK"):
    c.DS01Spawner.build_network_mode = os.environ["DS01_BUILD_NETWORK"]
# limits per group and user, idle and max-runtime retirement; edits apply without a restart
c.DS01Spawner.policy_file = os.environ.get("DS01_POLICY_FILE", str(here / "policy.yaml"))
# GPUs: NVML by default; DS01_SIMULATED_GPUS=N presents N pretend GPUs (passed as env only)
c.DS01Spawner.simulated_gpus = int(os.environ.get("DS01_SIMULATED_GPUS", "0"))

# several GPU servers: one swarm (its manager's engine), a registry every node pulls from,
# workspace_root on storage every node mounts at the same path (NFS)
if os.environ.get("DS01_SWARM_REGISTRY"):
    c.JupyterHub.spawner_class = "ds01-swarm"
    c.DS01SwarmSpawner.registry = os.environ["DS01_SWARM_REGISTRY"]
if os.environ.get("DS01_HUB_IP"):
    c.JupyterHub.hub_ip = c.JupyterHub.hub_connect_ip = os.environ["DS01_HUB_IP"]

# spawner class, hub networking, the ds01 service (GPU view) and its roles. It fills in
# only what is unset above, and hands the service the final c.DS01Spawner settings.
configure(
    c,
    admin_users=admins,
    service_port=int(os.environ.get("DS01_SERVICE_PORT", "10101")),
)

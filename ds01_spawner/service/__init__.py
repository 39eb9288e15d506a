"""The ``ds01`` JupyterHub service: the lab's own pages next to the hub.

Runs as a managed service (``python -m ds01_spawner.service``) at
``/services/ds01/``; users sign in through the hub (HubOAuth) and admin views
need the ``custom:ds01:admin`` scope. It reads the GPU ledger from the Docker
engine's labels, so it needs no hub API rights and no shared memory with the
hub. Today: who holds which GPU (page and JSON). Next: the image-update page.
"""

from .app import DS01Service, main

__all__ = ["DS01Service", "main"]

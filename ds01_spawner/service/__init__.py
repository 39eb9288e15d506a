"""The ``ds01`` JupyterHub service: the lab's own pages next to the hub.

Runs as a managed service (``python -m ds01_spawner.service``) at
``/services/ds01/``; users sign in through the hub (HubOAuth) and admin views
need the ``custom:ds01:admin`` scope. It serves the image-update page (your
images: packages, rebuilds, rollback, restart), "check limits", the admin GPU
page, and retires servers by the lab policy; each page has a JSON twin under
``api/``. It reads the sealed GPU ledger from the engine's labels and shares
the hub's state directory and DS01Spawner settings.
"""

from .app import DS01Service, main

__all__ = ["DS01Service", "main"]

"""`Refusal`: a request ds01 will not carry out, carrying the HTTP status that says why.

Raised by the plain modules (admission) and the service's manager; whoever
catches it (the spawner, a handler) passes its status on unchanged, so the
same refusal is the same status everywhere.
"""

from __future__ import annotations

from jupyterhub.spawner import SpawnException


class Refusal(Exception):
    """A refused request: a message the user can act on, an HTTP status, a short reason."""

    def __init__(
        self, message: str, *, status: int = 400, reason: str = "", html: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason
        self.html = html  # the same for a page, where it can say more (a build's log)


def spawn_exception(e: Refusal) -> SpawnException:
    """The refusal as JupyterHub's SpawnException, its clean message (and HTML) on the
    spawn page and in the REST answer: JupyterHub's progress stream and error pages
    read `jupyterhub_message` / `jupyterhub_html_message`, else show the repr."""
    out = SpawnException(e.message, reason=e.reason, status_code=e.status, message_html=e.html)
    out.jupyterhub_message = e.message
    if e.html:
        out.jupyterhub_html_message = e.html
    return out

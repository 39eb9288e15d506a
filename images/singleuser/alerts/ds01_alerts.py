"""The ds01 service's alerts for JupyterLab: `GET <base_url>ds01/alerts`.

A Jupyter server extension (enabled by jupyter_server_config.d/ds01_alerts.json
in the image) that reads ${DS01_WORKSPACE:-/workspace}/.ds01-alerts, where the
ds01 service appends retirement warnings, and answers its well-formed lines as
JSON. The labextension ds01-alerts polls it and shows them in a banner.

Why not the contents API: the file's name starts with a dot, and the contents
API answers 404 for hidden files unless `ContentsManager.allow_hidden` is set
for the whole server; it would also read the whole file, however big the
researcher made it. Here the file, which is the researcher's own and so
untrusted, is read as the terminals read it: only a regular file (a FIFO never
blocks), only its last 16 KiB, only lines `YYYY-MM-DDTHH:MM:SSZ LEVEL message`,
control characters removed. An absent file is no alert, not an error.

Standard library and jupyter_server only: it runs inside the user's server.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

FILE_NAME = ".ds01-alerts"
READ_LIMIT = 16384  # bytes from the end of the file
MAX_ALERTS = 50
MAX_MESSAGE = 1000  # characters, as the ds01 service writes them at most
LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (warning|retired|info) (.*)", re.ASCII)


def alerts_file() -> str:
    return os.path.join(os.environ.get("DS01_WORKSPACE") or "/workspace", FILE_NAME)


def read_tail(path: str, limit: int = READ_LIMIT) -> str:
    """The last `limit` bytes of a regular file as text, from its first whole line;
    "" when there is no such file (absent, a directory, a FIFO, a device)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return ""  # never open a device or a FIFO
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return ""  # replaced between the stat and the open
        start = max(0, st.st_size - limit)
        os.lseek(fd, start, os.SEEK_SET)
        chunks, left = [], limit
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError:
        return ""
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if start > 0:
        data = data.partition(b"\n")[2]  # the first line is cut
    return data.decode("utf-8", errors="replace")


def clean(message: str) -> str:
    """No control characters (C0, DEL, C1), no surrounding blanks, bounded length."""
    text = "".join(c for c in message if unicodedata.category(c) != "Cc").strip()
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "…"


def parse_alerts(text: str, limit: int = MAX_ALERTS) -> list[dict[str, str]]:
    """The well-formed lines of an alerts file, oldest first, at most the last `limit`."""
    alerts = []
    for line in text.split("\n"):
        match = LINE.fullmatch(line.rstrip("\r"))
        if match and (message := clean(match[3])):
            alerts.append({"time": match[1], "level": match[2], "message": message})
    return alerts[-limit:]


class AlertsHandler(APIHandler):
    auth_resource = "contents"  # whoever may read the server's files may read these
    # reading the alerts is not using the server: it must not hold off idle retirement
    _track_activity = False

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.set_header("Cache-Control", "no-store")
        self.finish({"alerts": parse_alerts(read_tail(alerts_file()))})


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "ds01_alerts"}]


def _load_jupyter_server_extension(serverapp) -> None:
    route = url_path_join(serverapp.web_app.settings["base_url"], "ds01", "alerts")
    serverapp.web_app.add_handlers(".*$", [(route, AlertsHandler)])

"""A tiny PyPI-style package index on 127.0.0.1, serving wheels the test makes itself.

Builds reach it with host networking (see ENVIRONMENT.md): no real index is
touched, and pip treats 127.0.0.0/8 as a secure origin.
"""

from __future__ import annotations

import functools
import http.server
import io
import threading
import zipfile
from pathlib import Path


def make_wheel(name: str, version: str = "1.0", body: str = "VALUE = 42\n") -> tuple[str, bytes]:
    """A minimal pure-Python wheel: (file name, bytes)."""
    dist = f"{name}-{version}.dist-info"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(f"{name}/__init__.py", body)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: ds01-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{dist}/RECORD", "")
    return f"{name}-{version}-py3-none-any.whl", buf.getvalue()


class PackageIndex:
    """`with PackageIndex(tmp, {"ds01hello": "1.0"}) as index: index.url` -> .../simple/"""

    def __init__(self, root: Path, packages: dict[str, str]) -> None:
        self.root = root
        for name, version in packages.items():
            filename, data = make_wheel(name, version)
            project = root / "simple" / name
            project.mkdir(parents=True, exist_ok=True)
            (project / filename).write_bytes(data)
            (project / "index.html").write_text(f'<a href="{filename}">{filename}</a>\n')
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple/"

    def __enter__(self) -> PackageIndex:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

"""Hub-side state files (project records, uid map, builds, GPU holds, notices)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any, **dumps: Any) -> None:
    """Replace `path` atomically: readers, in this process or another, never see half a file.

    The temporary name carries the pid, so the hub and the service writing the
    same record at once cannot clobber each other's temporary file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, **dumps))
    os.replace(tmp, path)

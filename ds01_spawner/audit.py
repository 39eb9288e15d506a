"""The audit trail: every event that changes who holds what, as versioned JSON events.

Written the ecosystem's way: a `jupyter_events.EventLogger` with our schemas
(`event-schemas/<kind>/v1.yaml`), validated on emit, and logging handlers.
The default handler appends one JSON line per event to
``{state_dir}/audit/<YYYY-MM>.<process>.jsonl``: a file per month (the
rotation) and per process (the hub and the service never write the same
file), flushed at once, so an event acknowledged before a SIGKILL is on disk.

`emit` never raises and never waits on anything but a local append: the
trail must not fail or slow a spawn. `read_events` merges the files in time
order for the usage page, the metrics and the tests.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jupyter_events import EventLogger

SCHEMA_DIR = Path(__file__).parent / "event-schemas"
SCHEMA_BASE = "https://schema.ds01.dev/audit/"
KINDS = ("server", "gpu", "build", "packages", "policy", "refusal", "image")
MAX_LINE_BYTES = 64 * 1024  # a longer line in a trail file is not ours: skipped
MAX_TEXT = 4000  # an event's text (an engine's error, a refusal) is cut to this

log = logging.getLogger(__name__)


def schema_id(kind: str) -> str:
    return SCHEMA_BASE + kind


def month_of(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m")


def parse_time(stamp: str) -> datetime:
    """An event's ``__timestamp__`` (jupyter_events writes ``...+00:00Z``) as a UTC datetime."""
    stamp = stamp.removesuffix("Z")
    when = datetime.fromisoformat(stamp)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def seconds_since(stamp: str | None) -> float | None:
    """Seconds from an ISO 8601 time (a container's ``ds01.started_at``) until now; None
    when there is none or it cannot be read."""
    try:
        return round((datetime.now(timezone.utc) - parse_time(stamp or "")).total_seconds(), 3)
    except ValueError:
        return None


class MonthlyFileHandler(logging.Handler):
    """One line per event in ``<directory>/<YYYY-MM>.<process>.jsonl``, flushed at once."""

    def __init__(self, directory: str | os.PathLike[str], process: str) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.process = process
        self._month = ""
        self._file: Any = None
        self._lock = threading.Lock()

    def path_for(self, month: str) -> Path:
        return self.directory / f"{month}.{self.process}.jsonl"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            month = month_of(datetime.now(timezone.utc))
            with self._lock:
                if month != self._month or self._file is None:
                    self._open(month)
                self._file.write(line + "\n")
                self._file.flush()
        except Exception:
            self.handleError(record)

    def _open(self, month: str) -> None:
        if self._file is not None:
            self._file.close()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._file = open(self.path_for(month), "a", encoding="utf-8")  # noqa: SIM115
        self._month = month

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        super().close()


class AuditLog:
    """The process's audit trail: `emit(kind, **data)`, validated against the kind's schema."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        process: str,
        handlers: Iterable[logging.Handler] = (),
    ) -> None:
        self.directory = Path(state_dir) / "audit"
        self.file_handler = MonthlyFileHandler(self.directory, process)
        self.logger = EventLogger(handlers=[self.file_handler, *handlers])
        for kind in KINDS:
            self.logger.register_event_schema(SCHEMA_DIR / kind / "v1.yaml")

    def emit(self, kind: str, **data: Any) -> dict[str, Any] | None:
        """Record one event; None (and a warning in the log) if it could not be."""
        clean = {k: _bounded(v) for k, v in data.items() if v is not None}
        if kind not in KINDS:
            log.warning("ds01 audit: no event kind %r (%s)", kind, clean)
            return None
        try:
            return self.logger.emit(schema_id=schema_id(kind), data=clean)
        except Exception as e:
            log.warning("ds01 audit: could not record a %s event %s: %s", kind, clean, e)
            return None

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_TEXT:
        return value[: MAX_TEXT - 1] + "…"
    return value


def read_events(
    state_dir: str | os.PathLike[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    kinds: Iterable[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The trail's events from every process, oldest first, each with ``kind`` and ``at``
    (a UTC datetime) added. A line cut short by a crash, or not JSON, is skipped."""
    directory = Path(state_dir) / "audit"
    wanted = {schema_id(k) for k in kinds} if kinds is not None else None
    first = month_of(since) if since else ""
    last = month_of(until) if until else "9999-99"
    events = []
    for path in sorted(directory.glob("*.jsonl")):
        month = path.name.split(".", 1)[0]
        if not first <= month <= last:
            continue
        with open(path, "rb") as f:
            for raw in f:
                event = parse_line(raw)
                if event is None or (wanted is not None and event["__schema__"] not in wanted):
                    continue
                if (since and event["at"] < since) or (until and event["at"] >= until):
                    continue
                events.append(event)
    events.sort(key=lambda e: e["at"])
    return iter(events)


def parse_line(raw: bytes) -> dict[str, Any] | None:
    """One line of a trail file as an event (with ``kind`` and ``at``), or None: also for
    readers that follow the files themselves (the metrics read only what was appended)."""
    if len(raw) > MAX_LINE_BYTES or not raw.endswith(b"\n"):
        return None  # too long to be ours, or the last line of a process killed mid-write
    try:
        event = json.loads(raw)
        event["at"] = parse_time(event["__timestamp__"])
        event["kind"] = event["__schema__"].removeprefix(SCHEMA_BASE)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return event

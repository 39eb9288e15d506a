"""What the commands print: the service's JSON as short text tables (pure functions)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# the last event of a build's stream and what it means
BUILD_DONE = {"built": True, "succeeded": True, "failed": False, "interrupted": False}


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell; the last one left ragged."""
    cells = [list(header), *[list(map(str, r)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    lines = []
    for row in cells:
        padded = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)] + [row[-1]]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def image_state(p: Mapping[str, Any]) -> str:
    """One word or two on the project's image, as the image page says it."""
    build = p.get("build") or {}
    if build.get("status") == "running":
        return "building"
    if not p.get("built"):
        return "not built (built at first start)"
    if p.get("dockerfile_changed"):
        return "outdated: Dockerfile changed, rebuild"
    if build.get("status") == "failed":
        return "last rebuild failed (previous image in use)"
    return "up to date"


def running(p: Mapping[str, Any]) -> str:
    servers = p.get("running") or []
    if not servers:
        return "stopped"
    names = ", ".join(s.get("server") or "default" for s in servers)
    outdated = any(s.get("outdated") for s in servers)
    return f"running ({names})" + (", on an older image" if outdated else "")


def lost(p: Mapping[str, Any]) -> list[str]:
    record = p.get("installed_last_session") or {}
    return [str(x) for x in record.get("packages") or []]


def image_list(projects: Iterable[Mapping[str, Any]]) -> str:
    rows = [
        (
            p.get("project", "?"),
            p.get("type", "?"),
            p.get("built_at") or "-",
            size(p.get("size")),
            image_state(p),
        )
        for p in projects
    ]
    if not rows:
        return "No projects yet: create one with `project init NAME`."
    return table(rows, ("PROJECT", "TYPE", "BUILT", "SIZE", "IMAGE"))


def project_list(projects: Iterable[Mapping[str, Any]], url_of) -> str:
    rows = []
    for p in projects:
        servers = p.get("running") or []
        where = url_of(servers[0].get("server") or "") if servers else ""
        rows.append((p.get("project", "?"), p.get("type", "?"), running(p), where))
    if not rows:
        return "No projects yet: create one with `project init NAME`."
    return table(rows, ("PROJECT", "TYPE", "STATUS", "URL"))


def packages(p: Mapping[str, Any]) -> str:
    """The project's image packages, and what the last session installed and lost."""
    lines = [
        f"Project {p.get('project')} (type {p.get('type')}), image {p.get('image')}",
        f"  image: {image_state(p)}" + (f", built {p['built_at']}" if p.get("built_at") else ""),
    ]
    if p.get("problem"):
        lines.append(f"  the Dockerfile cannot be edited here: {p['problem']}")
    managed = p.get("packages") or {}
    lines.append("  pip: " + (", ".join(managed.get("pip") or []) or "(none added)"))
    lines.append("  apt: " + (", ".join(managed.get("apt") or []) or "(none added)"))
    if lost(p):
        lines.append(
            "  pip-installed in the last session and lost at its retire: " + ", ".join(lost(p))
        )
    lines.append(f"  server: {running(p)}")
    return "\n".join(lines)


def build_event(event: Mapping[str, Any]) -> str | None:
    """One line of a build's log as the terminal shows it; None for nothing to show."""
    message = str(event.get("message") or "").rstrip()
    if not message:
        return None
    progress = event.get("progress")
    if event.get("phase") in ("step", "building", "waiting", "built", "failed") and isinstance(
        progress, int
    ):
        return f"[{progress:3d}%] {message}"
    return f"       {message}"


def start_event(event: Mapping[str, Any]) -> str | None:
    """One line of a server's start (the hub's progress events)."""
    message = str(event.get("message") or "").rstrip()
    if not message:
        return None
    progress = event.get("progress")
    return f"[{progress:3d}%] {message}" if isinstance(progress, int) else message


def limit_value(entry: Any) -> str:
    """One limit as the page shows it: its value, and where it comes from."""
    if not isinstance(entry, Mapping):
        return str(entry)
    value = entry.get("value")
    value = "none" if value is None else str(value)
    source = entry.get("source")
    return f"{value} ({source})" if source else value


def limits(data: Mapping[str, Any]) -> str:
    """The limits page as text: your limits, what you use, each server's time left."""
    lines = []
    for person in data.get("users") or []:
        group = person.get("group") or "default"
        lines.append(f"Limits for {person.get('user')} (group {group}):")
        for key, value in (person.get("limits") or {}).items():
            lines.append(f"  {key.replace('_', ' ')}: {limit_value(value)}")
        use = person.get("usage") or {}
        most = use.get("max_running_projects")
        lines.append(
            f"In use: {use.get('running_projects', 0)} running project(s)"
            + (f" of {most}" if most is not None else "")
            + f", {use.get('gpus', 0)} GPU(s)"
            + (f" of {use['max_gpus']}" if use.get("max_gpus") is not None else "")
        )
        for hold in use.get("kept_gpus") or []:
            lines.append(f"  GPU {hold.get('uuid')} kept for {hold.get('project')}")
        servers = person.get("servers") or []
        if servers:
            rows = [
                (
                    s.get("project") or "?",
                    s.get("runtime") or "-",
                    s.get("runtime_left") or "no limit",
                    s.get("idle_left") or "no limit",
                    s.get("message") or s.get("status") or "",
                )
                for s in servers
            ]
            lines.append(table(rows, ("PROJECT", "RUNNING FOR", "RUNTIME LEFT", "IDLE LEFT", "")))
            for s in servers:
                project = s.get("project") or "?"
                if s.get("keep_alive_until"):
                    lines.append(
                        f"  {project}: kept alive by /workspace/.keep-alive until "
                        f"{s['keep_alive_until']} (idle retirement only)"
                    )
                for exemption in s.get("exemptions") or []:
                    lines.append(f"  {project}: {exemption}")
        for e in person.get("exemptions") or []:
            if isinstance(e, Mapping) and e.get("lifts"):
                why = f" ({e['reason']})" if e.get("reason") else ""
                state = "" if e.get("in_force") else " [expired]"
                lifts = " and ".join(map(str, e["lifts"]))
                lines.append(
                    f"Exemption for {e.get('who')} {e.get('name')}: {lifts} lifted until "
                    f"{e.get('until')}{why}{state}"
                )
    recent = data.get("retirements") or []
    if recent:
        lines.append("Recently retired:")
        for r in recent[:5]:
            what = r.get("message") or r.get("reason") or ""
            lines.append(f"  {r.get('project') or r.get('server') or '?'}: {what}")
    return "\n".join(lines)

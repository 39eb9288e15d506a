"""Usage: GPU-hours this month and last, per project for a researcher, per user and
group for admins (``?all=1``), with efficiency, a chart and a CSV export.

The page, its JSON twin (``api/usage``) and the CSV (``usage.csv`` or
``?format=csv``) are one computation, `usage.usage_from_trail`, over the audit
trail and the utilization samples: right across restarts of the hub and the
service. The trail is read in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone
from typing import Any

from tornado import web

from ..usage import Amount, RowKey, totals, usage_csv, usage_from_trail
from .base import BaseHandler

CHART_BAR_WIDTH = 520  # pixels for the longest bar
USAGE_MAX_AGE = 10.0  # seconds one reading of the trail serves every page view


class UsageCache:
    """One reading of the trail at a time, shared by every view for `USAGE_MAX_AGE`:
    reading a long trail is CPU work, and no user's reloads may queue up others'."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self._lock = asyncio.Lock()
        self._at = float("-inf")
        self._value: tuple[dict[RowKey, Amount], str, str] | None = None

    async def rows(self) -> tuple[dict[RowKey, Amount], str, str]:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at > USAGE_MAX_AGE:
                now = datetime.now(timezone.utc)
                self._value = await asyncio.to_thread(usage_from_trail, self.state_dir, now)
                self._at = time.monotonic()
            return self._value


def format_hours(hours: float) -> str:
    if hours == 0:
        return "0"
    if hours >= 10:
        return f"{hours:,.1f}"
    return f"{hours:.2f}" if hours >= 0.01 else f"{hours:.4f}"


def format_efficiency(percent: float | None) -> str:
    return "—" if percent is None else f"{percent:.0f} %"


def _json(item: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        name: item["name"],
        "this_month": item["this_month"].as_json(),
        "last_month": item["last_month"].as_json(),
    }


def usage_report(
    rows: dict[RowKey, Amount], this: str, last: str, everyone: bool
) -> dict[str, Any]:
    """The JSON twin: totals, and per project (a researcher) or per user and group (admins)."""
    total = totals(rows, lambda k: "", this, last)
    data: dict[str, Any] = {
        "months": {"this": this, "last": last},
        "total": {
            "this_month": (total[0]["this_month"] if total else Amount()).as_json(),
            "last_month": (total[0]["last_month"] if total else Amount()).as_json(),
        },
    }
    if everyone:
        groups_of: dict[str, set[str]] = {}
        for key in rows:
            groups_of.setdefault(key.user, set()).add(key.group)
        data["users"] = [
            {**_json(item, "user"), "groups": sorted(groups_of.get(item["name"], ()))}
            for item in totals(rows, lambda k: k.user, this, last)
        ]
        data["groups"] = [_json(i, "group") for i in totals(rows, lambda k: k.group, this, last)]
    else:
        data["projects"] = [
            _json(i, "project") for i in totals(rows, lambda k: k.project, this, last)
        ]
    return data


def bar_chart(items: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Bars for the page's inline SVG: this month's and last month's GPU-hours per item."""
    peak = max([i[m]["gpu_hours"] for i in items for m in ("this_month", "last_month")] + [0.0])
    scale = CHART_BAR_WIDTH / peak if peak > 0 else 0.0
    return [
        {
            "label": i[name] or "defaults",
            "this": i["this_month"]["gpu_hours"],
            "last": i["last_month"]["gpu_hours"],
            "this_width": round(i["this_month"]["gpu_hours"] * scale, 1),
            "last_width": round(i["last_month"]["gpu_hours"] * scale, 1),
        }
        for i in items
    ]


class UsageHandler(BaseHandler):
    @web.authenticated
    async def get(self, csv: str | None = None) -> None:
        everyone = self.get_argument("all", "") == "1"
        if everyone:
            self.require_admin()
        cache = self.settings.get("usage") or UsageCache(self.ds01.shared_settings.state_dir)
        rows, this, last = await cache.rows()
        if not everyone:
            me = self.current_user["name"]
            rows = {k: v for k, v in rows.items() if k.user == me}
        if csv or self.get_argument("format", "") == "csv":
            self.send_csv(rows, this, everyone)
            return
        data = usage_report(rows, this, last, everyone)
        chart = (
            bar_chart(data["users"], "user") if everyone else bar_chart(data["projects"], "project")
        )
        self.respond(
            data,
            "usage.html",
            everyone=everyone,
            chart=chart,
            chart_width=CHART_BAR_WIDTH,
            format_hours=format_hours,
            format_efficiency=format_efficiency,
            **data,
        )

    def send_csv(self, rows: dict[RowKey, Amount], this: str, everyone: bool) -> None:
        who = "all" if everyone else self.current_user["name"]
        filename = re.sub(r"[^A-Za-z0-9._-]", "_", f"ds01-usage-{who}-{this}.csv")
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Content-Disposition", f'attachment; filename="{filename}"')
        self.finish(usage_csv(rows))

"""Exemptions: a retirement limit lifted for one user or group, until a date.

    exemptions:
      - user: alice
        lifts: [idle_timeout]
        until: 2027-01-31          # through the end of that day (the host's time zone)
        reason: thesis experiments
      - group: faculty
        lifts: [max_runtime, idle_timeout]
        until: 2026-12-24T18:00

The policy file's top-level `exemptions` list, validated like the rest of it
(`parse_exemptions`: an unknown key, a bad date, a limit that cannot be
lifted is a `PolicyError` at file, line and key). An exemption past its
`until` is ignored (`in_force`), but stays listed, as expired, on the limits
page until someone removes it. Lifting the limits themselves is the
retirer's (`retirement.exempted`); everything here is pure.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .policyfile import Located

LIFTABLE = ("max_runtime", "idle_timeout")  # the retirement limits an exemption may lift
_KEYS = ("user", "group", "lifts", "until", "reason")
_NAME = re.compile(r"\S{1,255}")


@dataclass(frozen=True)
class Exemption:
    who: str  # "user" or "group"
    name: str  # the hub's user or group name
    lifts: tuple[str, ...]
    until: float  # epoch seconds: in force before this
    until_text: str  # as written, for people
    reason: str = ""

    def applies_to(self, user: str, groups: Iterable[str]) -> bool:
        return self.name == user if self.who == "user" else self.name in set(groups)

    def in_force(self, now: float) -> bool:
        return now < self.until

    def describe(self, now: float) -> dict[str, Any]:
        """One row of the limits page (and its JSON)."""
        return {
            "who": self.who,
            "name": self.name,
            "lifts": list(self.lifts),
            "until": self.until_text,
            "reason": self.reason,
            "in_force": self.in_force(now),
        }


def exemptions_for(
    exemptions: Iterable[Exemption], user: str, groups: Iterable[str], now: float
) -> list[Exemption]:
    """The exemptions in force now for `user` (by name, or as a member of any group named)."""
    groups = list(groups)
    return [e for e in exemptions if e.in_force(now) and e.applies_to(user, groups)]


# ---------------------------------------------------------------- parsing


def parse_exemptions(value: Any, at: Located) -> tuple[Exemption, ...]:
    """The `exemptions` list; every error names the entry's key (`exemptions[2].until`)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise at.error(
            "exemptions",
            "must be a list of entries, e.g. - {user: alice, lifts: [...], until: ...}",
        )
    return tuple(_exemption(item, f"exemptions[{i}]", at) for i, item in enumerate(value))


def _exemption(item: Any, key: str, at: Located) -> Exemption:
    if not isinstance(item, dict):
        raise at.error(key, "must be a mapping: {user: NAME} or {group: NAME}, lifts, until")
    for name in item:
        if name not in _KEYS:
            raise at.error(f"{key}.{name}", f"unknown key; known: {', '.join(_KEYS)}")
    whom = [k for k in ("user", "group") if k in item]
    if len(whom) != 1:
        raise at.error(key, "needs exactly one of user: NAME or group: NAME")
    who = whom[0]
    name = item[who]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise at.error(f"{key}.{who}", f"{name!r} is not a {who} name")
    if "lifts" not in item:
        raise at.error(key, f"needs lifts: the limits it lifts, e.g. [idle_timeout]; {_liftable()}")
    lifts = _lifts(item["lifts"], f"{key}.lifts", at)
    if "until" not in item:
        raise at.error(key, "needs until: a date (2027-01-31) or a time (2027-01-31T18:00)")
    try:
        until, text = parse_until(item["until"])
    except ValueError as e:
        raise at.error(f"{key}.until", str(e)) from None
    reason = item.get("reason", "")
    if not isinstance(reason, str):
        raise at.error(f"{key}.reason", f"{reason!r} is not text")
    return Exemption(who, name, lifts, until, text, reason.strip())


def _lifts(value: Any, key: str, at: Located) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) for v in items):
        raise at.error(key, f"{value!r} is not a list of limits; {_liftable()}")
    unknown = [v for v in items if v not in LIFTABLE]
    if unknown:
        raise at.error(key, f"{', '.join(unknown)} cannot be lifted; {_liftable()}")
    return tuple(dict.fromkeys(items))


def _liftable() -> str:
    return f"an exemption lifts {' and '.join(LIFTABLE)}"


def parse_until(value: Any) -> tuple[float, str]:
    """`until` as epoch seconds, and as written. A date is in force through the end of
    that day; a date or time without a zone is the host's local time."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = dt.date.fromisoformat(text) if len(text) == 10 else _datetime(text)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a date; write e.g. 2027-01-31 or 2027-01-31T18:00"
            ) from None
    if isinstance(value, dt.datetime):
        return value.timestamp(), value.isoformat(sep=" ", timespec="minutes")
    if isinstance(value, dt.date):
        end = dt.datetime.combine(value + dt.timedelta(days=1), dt.time())
        return end.timestamp(), value.isoformat()
    raise ValueError(f"{value!r} is not a date; write e.g. 2027-01-31 or 2027-01-31T18:00")


def _datetime(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))

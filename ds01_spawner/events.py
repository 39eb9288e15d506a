"""A bounded log of events that any number of readers follow by sequence number.

Builds and spawns both publish progress that pages and the hub follow while it
happens. A chatty build can print without end, so the log keeps only the last
`limit` events; readers follow by sequence number, so trimming never makes a
reader lose its place: it skips what was dropped (a gap in the numbers).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")


class EventLog(Generic[T]):
    """Append on the event loop; follow from any coroutine on it.

    `follow(after=n)` yields ``(seq, event)`` for every event numbered above `n`
    that is still kept, then waits for new ones until `close()`.
    """

    def __init__(self, limit: int = 5000) -> None:
        self._events: deque[T] = deque(maxlen=limit)
        self._next = 0  # the sequence number the next event gets
        self._changed = asyncio.Event()
        self.closed = False

    def __len__(self) -> int:
        return len(self._events)

    @property
    def first_seq(self) -> int:
        """The sequence number of the oldest event still kept."""
        return self._next - len(self._events)

    @property
    def last_seq(self) -> int:
        return self._next - 1

    def append(self, event: T) -> int:
        self._events.append(event)
        self._next += 1
        self._wake()
        return self._next - 1

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def since(self, after: int = -1) -> list[tuple[int, T]]:
        """The kept events numbered above `after`."""
        first = max(after + 1, self.first_seq)
        start = first - self.first_seq
        return [(first + i, e) for i, e in enumerate(list(self._events)[start:])]

    def tail(self, n: int) -> list[T]:
        return list(self._events)[-n:] if n > 0 else []

    def __iter__(self):
        return iter(list(self._events))

    def __getitem__(self, index: int) -> T:
        return self._events[index]

    async def follow(self, after: int = -1) -> AsyncIterator[tuple[int, T]]:
        seen = after
        while True:
            changed = self._changed
            for seq, event in self.since(seen):
                seen = seq
                yield seq, event
            if self.closed and seen >= self.last_seq:
                return
            if seen >= self.last_seq:
                await changed.wait()

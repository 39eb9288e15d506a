"""The bounded event log that builds and spawns publish to."""

import asyncio

from ds01_spawner.events import EventLog


async def test_followers_see_every_event_in_order_and_end_at_close():
    log: EventLog[int] = EventLog(10)

    async def collect():
        return [e async for _, e in log.follow()]

    early = asyncio.create_task(collect())
    await asyncio.sleep(0)
    for i in range(3):
        log.append(i)
        await asyncio.sleep(0)
    log.close()
    assert await early == [0, 1, 2]
    assert await collect() == [0, 1, 2], "a late reader still sees what is kept"


async def test_a_log_past_its_limit_never_stalls_a_reader():
    """Past the limit the old events go; a reader keeps its place by sequence number."""
    log: EventLog[int] = EventLog(100)
    seen: list[int] = []

    async def slow_reader():
        async for seq, event in log.follow():
            assert seq == event
            seen.append(seq)
            await asyncio.sleep(0.001)

    reader = asyncio.create_task(slow_reader())
    for i in range(6000):
        log.append(i)
        if i % 500 == 0:
            await asyncio.sleep(0)
    log.close()
    await asyncio.wait_for(reader, 5)
    assert seen[-1] == 5999, "the reader reached the end"
    assert seen == sorted(seen) and len(seen) < 6000, "it skipped what was trimmed"
    assert len(log) == 100 and log.first_seq == 5900


async def test_follow_after_resumes_from_a_sequence_number():
    log: EventLog[str] = EventLog(10)
    for word in "abcde":
        log.append(word)
    log.close()
    assert [(s, e) async for s, e in log.follow(after=2)] == [(3, "d"), (4, "e")]

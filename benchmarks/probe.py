"""Hub API latency as a client sees it: `GET URL` in a loop, from a separate process.

`Probe.start(url, token)` runs this module as `python -m benchmarks.probe URL
INTERVAL` (token in DS01_BENCH_TOKEN) until `finish()` closes its stdin; the
child then prints its samples as JSON. A separate process, so the timings are
not skewed by sharing the hub's interpreter. Times are time.monotonic(),
comparable across processes on Linux, so the caller cuts the samples into
windows (`latencies`) with its own monotonic() readings.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from statistics import median, quantiles

import requests

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Sample = list  # [sent at (monotonic), seconds, HTTP status or 0]


class Probe:
    """This module in a child process, timing GET `url` every `interval` seconds."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, token: str, interval: float = 0.1) -> Probe:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.probe",
            url,
            str(interval),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
            env={**os.environ, "DS01_BENCH_TOKEN": token},
        )
        return cls(process)

    async def finish(self) -> list[Sample]:
        self.process.stdin.close()
        out, _ = await self.process.communicate()
        return json.loads(out or b"[]")


def latencies(samples: list[Sample], start: float, end: float) -> list[float]:
    """Seconds of the successful requests sent between `start` and `end` (monotonic)."""
    return [dt for sent, dt, status in samples if status == 200 and start <= sent <= end]


def percentiles_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "max_ms": None}
    cuts = quantiles(seconds, n=20, method="inclusive") if len(seconds) > 1 else seconds * 19
    return {
        "n": len(seconds),
        "p50_ms": round(median(seconds) * 1000, 1),
        "p95_ms": round(cuts[18] * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
    }


def main() -> None:
    url = sys.argv[1]
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.1
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    session = requests.Session()
    session.headers["Authorization"] = f"token {os.environ['DS01_BENCH_TOKEN']}"
    samples = []
    while not stop.is_set():
        sent = time.monotonic()
        try:
            status = session.get(url, timeout=60).status_code
        except requests.RequestException:
            status = 0
        samples.append([sent, time.monotonic() - sent, status])
        stop.wait(interval)
    print(json.dumps(samples))


if __name__ == "__main__":
    main()

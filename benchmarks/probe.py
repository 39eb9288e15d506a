"""Time `GET URL` in a loop from its own process until stdin closes; print the samples as JSON.

Run by the storm benchmark as `python -m benchmarks.probe URL` with the token in
DS01_BENCH_TOKEN: a separate process, so the timings are what a client sees,
not skewed by sharing the hub's interpreter. Times are time.monotonic(),
comparable across processes on Linux.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import requests


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
    samples = []  # [sent at (monotonic), seconds, HTTP status or 0]
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

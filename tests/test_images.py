"""Image names, build contexts and reading docker's build stream."""

import asyncio
import tarfile

import pytest

from ds01_spawner.images import (
    Build,
    BuildError,
    BuildEvent,
    BuildSpec,
    BuildStreamReader,
    context_tar,
    image_ref,
    image_repository,
)


def test_image_names_follow_ds01_convention():
    assert image_repository("alice", "thesis") == "ds01-alice/thesis"
    assert image_ref("alice", "thesis") == "ds01-alice/thesis:latest"
    assert image_ref("h-baker-1a2b3c4d", "x", "previous") == "ds01-h-baker-1a2b3c4d/x:previous"


def test_context_holds_only_the_dockerfile():
    with tarfile.open(fileobj=context_tar("FROM scratch\n")) as tar:
        assert tar.getnames() == ["Dockerfile"]
        assert tar.extractfile("Dockerfile").read() == b"FROM scratch\n"


def test_reader_turns_steps_into_progress():
    reader = BuildStreamReader()
    events = []
    for chunk in [
        {"stream": "Step 1/4 : ARG BASE_IMAGE\n"},
        {"stream": " ---> Running in abc\n"},
        {"stream": "Step 3/4 : RUN pip install x\n"},
        {"aux": {"ID": "sha256:abc"}},
        {"stream": "Successfully built abc\n"},
    ]:
        events += reader.feed(chunk)
    steps = [e for e in events if e.phase == "step"]
    assert [(e.message, e.progress) for e in steps] == [
        ("Step 1/4 : ARG BASE_IMAGE", 0),
        ("Step 3/4 : RUN pip install x", 50),
    ]
    assert events[1] == BuildEvent("log", " ---> Running in abc", 0)
    assert [e.message for e in events if e.phase == "log"][-1] == "Successfully built abc"
    assert reader.image_id == "sha256:abc"
    reader.raise_for_error()  # no error: nothing raised


def test_reader_reports_failing_step_and_tail():
    reader = BuildStreamReader(tail_lines=3)
    for i in range(10):
        reader.feed({"stream": f"noise {i}\n"})
    reader.feed({"stream": "Step 2/3 : RUN pip install nope\n"})
    reader.feed({"stream": "ERROR: No matching distribution found for nope\n"})
    reader.feed({"error": "The command '/bin/sh -c pip install nope' returned a non-zero code: 1"})
    with pytest.raises(BuildError) as info:
        reader.raise_for_error()
    assert "step 2/3 (RUN pip install nope)" in str(info.value)
    assert "non-zero code: 1" in str(info.value)
    assert info.value.log_tail == [
        "noise 9",
        "Step 2/3 : RUN pip install nope",
        "ERROR: No matching distribution found for nope",
    ]


def test_a_missing_base_image_is_named_with_its_build_args_expanded():
    reader = BuildStreamReader()
    reader.feed({"stream": "Step 2/4 : FROM ${BASE_IMAGE}\n"})
    reader.feed({"error": 'Get "https://registry-1.docker.io/v2/": dial tcp: no such host'})
    with pytest.raises(BuildError) as info:
        reader.raise_for_error({"BASE_IMAGE": "ds01/gone:latest"})
    message = str(info.value)
    assert "the base image ds01/gone:latest is not on this machine" in message
    assert "images/build" in message and "no such host" in message


async def test_build_events_reach_every_follower_in_order():
    build = Build(BuildSpec("x:latest", "FROM scratch", {}), asyncio.get_running_loop())

    async def collect():
        return [e.message async for e in build.follow()]

    early = asyncio.create_task(collect())
    await asyncio.sleep(0)
    for i in range(3):
        build.publish(BuildEvent("log", f"line {i}"))
        await asyncio.sleep(0)
    build.finish("sha256:1", None)
    late = await collect()  # joins after the end: still sees everything
    assert await early == late == ["line 0", "line 1", "line 2"]
    assert await build.wait() == "sha256:1"


async def test_failed_build_raises_for_waiters():
    build = Build(BuildSpec("x:latest", "FROM scratch", {}), asyncio.get_running_loop())
    build.finish(None, BuildError("boom", ["last line"]))
    await asyncio.sleep(0)
    with pytest.raises(BuildError, match="boom"):
        await build.wait()


def test_a_build_whose_process_died_reads_as_interrupted(tmp_path):
    """A service restart mid-build: the record says running, but nobody holds the lock."""
    import signal
    import subprocess
    import sys
    import time

    from ds01_spawner.images import BuildRecords

    code = (
        "import sys, time\n"
        "from ds01_spawner.images import BuildRecords\n"
        f"records = BuildRecords({str(tmp_path)!r})\n"
        "with records.hold('ds01-a/p:latest') as held:\n"
        "    records.write('ds01-a/p:latest', status='running', started='t0')\n"
        "    print('building', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "building"
        records = BuildRecords(tmp_path)
        assert records.read("ds01-a/p:latest")["status"] == "running"
        with records.hold("ds01-a/p:latest") as held:
            assert held is False, "a second builder of the same image is kept out"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    time.sleep(0.1)
    record = BuildRecords(tmp_path).read("ds01-a/p:latest")
    assert record["status"] == "interrupted" and record["started"] == "t0"


def test_build_records_keep_the_outcome(tmp_path):
    from ds01_spawner.images import BuildRecords

    records = BuildRecords(tmp_path)
    assert records.read("ds01-a/p:latest") is None
    records.write("ds01-a/p:latest", status="failed", error="boom", log_tail=["x"])
    records.write("ds01-a/p:latest", status="running", started="t1")
    assert records.read("ds01-a/p:latest") == {
        "image": "ds01-a/p:latest",
        "status": "interrupted",  # nobody holds its lock in this test
        "started": "t1",
    }

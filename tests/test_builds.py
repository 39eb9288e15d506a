"""Running builds: following their events, their records on disk, the builder's slots."""

import asyncio
import tarfile

import pytest

from ds01_spawner.builds import MAX_LOG_LINES, Build, BuildRecords, ImageBuilder
from ds01_spawner.images import BUILD_NETWORK, BuildError, BuildEvent, BuildSpec


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

    code = (
        "import sys, time\n"
        "from ds01_spawner.builds import BuildRecords\n"
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
    records = BuildRecords(tmp_path)
    assert records.read("ds01-a/p:latest") is None
    records.write("ds01-a/p:latest", status="failed", error="boom", log_tail=["x"])
    records.write("ds01-a/p:latest", status="running", started="t1")
    assert records.read("ds01-a/p:latest") == {
        "image": "ds01-a/p:latest",
        "status": "interrupted",  # nobody holds its lock in this test
        "started": "t1",
    }


class FakeEngine:
    """A docker.APIClient stand-in whose builds run until the test lets them finish."""

    def __init__(self) -> None:
        import threading

        self.gates: dict[str, threading.Event] = {}
        self.started: list[str] = []
        self.kwargs: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.info = {"DefaultRuntime": "runc", "CgroupDriver": "cgroupfs"}

    def client(self):
        engine = self

        class Client:
            hooks = {"response": []}

            def inspect_image(self, ref):
                import docker.errors

                raise docker.errors.ImageNotFound(ref)

            def networks(self, names):
                return [{"Name": n} for n in names]

            timeout = 60

            def info(self):
                return engine.info

            def _url(self, path):
                return path

            def _raise_for_status(self, response):
                pass

            def _post(self, url, data, params, **kwargs):
                import threading

                tag = params["t"]
                with engine.lock:
                    engine.started.append(tag)
                    engine.kwargs[tag] = {"fileobj": data, **params}
                    engine.gates.setdefault(tag, threading.Event())
                return tag

            def _stream_helper(self, tag, decode):
                engine.gates[tag].wait(10)
                yield {"stream": "Step 1/1 : FROM ds01/singleuser\n"}
                yield {"aux": {"ID": f"sha256:{tag}"}}

            def close(self):
                pass

        return Client()

    def release(self, tag: str) -> None:
        import threading

        with self.lock:
            self.gates.setdefault(tag, threading.Event()).set()


def spec(owner: str, project: str, dockerfile: str = "FROM ds01/singleuser\n") -> BuildSpec:
    return BuildSpec(
        f"ds01-{owner}/{project}:latest",
        dockerfile,
        {},
        owner=owner,
        allowed_images=("ds01/*",),
        own_prefix=f"ds01-{owner}/",
    )


async def until(predicate, timeout: float = 5) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_one_user_cannot_hold_every_build_slot():
    """alice asks for two builds, then bob for one: bob's runs beside alice's first."""
    engine = FakeEngine()
    builder = ImageBuilder(2, engine.client, max_per_user=1)
    first = builder.build(spec("alice", "a"))
    second = builder.build(spec("alice", "b"))
    bobs = builder.build(spec("bob", "c"))
    await until(lambda: len(engine.started) == 2)
    # both run at once, each on a worker thread: which reaches the engine first is chance
    assert sorted(engine.started) == ["ds01-alice/a:latest", "ds01-bob/c:latest"]
    assert second.events[0].phase == "waiting"
    assert "your build of ds01-alice/a:latest" in second.events[0].message
    engine.release("ds01-alice/a:latest")
    assert await first.wait() == "sha256:ds01-alice/a:latest"
    await until(lambda: len(engine.started) == 3)
    assert engine.started[2] == "ds01-alice/b:latest", "alice's next build starts after hers"
    for tag in ("ds01-alice/b:latest", "ds01-bob/c:latest"):
        engine.release(tag)
    await second.wait()
    await bobs.wait()


async def test_builds_wait_in_arrival_order_for_a_slot():
    engine = FakeEngine()
    builder = ImageBuilder(1, engine.client, max_per_user=1)
    builds = [builder.build(spec(user, "p")) for user in ("u1", "u2", "u3")]
    assert "Waiting for a build slot (1 running, 0 waiting ahead)" in builds[1].events[0].message
    assert "1 waiting ahead" in builds[2].events[0].message
    for user in ("u1", "u2", "u3"):
        await until(lambda u=user: engine.started[-1:] == [f"ds01-{u}/p:latest"])
        engine.release(f"ds01-{user}/p:latest")
    for b in builds:
        await b.wait()
    assert engine.started == [f"ds01-{u}/p:latest" for u in ("u1", "u2", "u3")]


async def test_a_dockerfile_breaking_a_rule_is_never_sent_to_the_engine():
    engine = FakeEngine()
    builder = ImageBuilder(1, engine.client)
    build = builder.build(spec("eve", "p", "FROM ds01/singleuser\nLABEL ds01.gpu.uuids=GPU-0\n"))
    with pytest.raises(BuildError, match=r"line 2: LABEL ds01\.gpu\.uuids is not allowed"):
        await build.wait()
    assert engine.started == []


async def test_a_build_runs_hardened_on_its_own_network_without_gpus():
    engine = FakeEngine()
    engine.info["DefaultRuntime"] = "nvidia"  # it would hand a base image's GPUs to RUN
    builder = ImageBuilder(1, engine.client)
    hardened = BuildSpec(
        "ds01-ada/p:latest",
        "FROM ds01/singleuser\nRUN true\n",
        {},
        network_mode=BUILD_NETWORK,
        memory=2 << 30,
        cpu_shares=256,
        owner="ada",
        allowed_images=("ds01/*",),
    )
    build = builder.build(hardened)
    engine.release("ds01-ada/p:latest")
    await build.wait()
    kwargs = engine.kwargs["ds01-ada/p:latest"]
    assert kwargs["networkmode"] == BUILD_NETWORK
    assert (kwargs["cpushares"], kwargs["memory"], kwargs["memswap"]) == (256, 2 << 30, 2 << 30)
    with tarfile.open(fileobj=kwargs["fileobj"]) as tar:
        sent = tar.extractfile("Dockerfile").read().decode()
    assert sent.split("\n")[1] == "ENV NVIDIA_VISIBLE_DEVICES=void"


async def test_where_builds_get_no_gpu_anyway_the_dockerfile_is_built_as_written():
    engine = FakeEngine()
    build = ImageBuilder(1, engine.client).build(spec("ada", "p"))
    engine.release("ds01-ada/p:latest")
    await build.wait()
    with tarfile.open(fileobj=engine.kwargs["ds01-ada/p:latest"]["fileobj"]) as tar:
        assert tar.extractfile("Dockerfile").read().decode() == "FROM ds01/singleuser\n"


async def test_a_follower_of_a_build_past_the_log_limit_reaches_its_end():
    """Past 5,000 lines the old log trimmed under its readers, who then froze."""
    build = Build(BuildSpec("x:latest", "FROM scratch", {}), asyncio.get_running_loop())
    seen: list[str] = []

    async def follow():
        async for event in build.follow():
            seen.append(event.message)
            await asyncio.sleep(0)

    reader = asyncio.create_task(follow())
    for i in range(MAX_LOG_LINES + 1500):
        build.publish(BuildEvent("log", f"line {i}"))
        if i % 1000 == 0:
            await asyncio.sleep(0.01)
    build.publish(BuildEvent("built", "done", 100))
    build.finish("sha256:1", None)
    await asyncio.wait_for(reader, 10)
    assert seen[-1] == "done" and seen[-2] == f"line {MAX_LOG_LINES + 1499}"
    assert len(build.log_lines) == MAX_LOG_LINES - 1, "the log stays bounded"

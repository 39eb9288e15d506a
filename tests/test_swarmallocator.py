"""The GPU allocator on a swarm, over what a manager answers (a fake docker-py client)."""

from ds01_spawner.gpus import GpuRequest
from ds01_spawner.ledger import LedgerSeal
from ds01_spawner.nvml import GpuSlot
from ds01_spawner.swarmallocator import swarm_gpus

from .test_swarmledger import node, service, task


class FakeManager:
    """What a manager's docker-py APIClient answers (the swarm API's dicts)."""

    def __init__(self, nodes, services, tasks):
        self.answers = {"nodes": nodes, "services": services, "tasks": tasks}
        self.asked, self.closed = [], 0

    def nodes(self):
        self.asked.append("nodes")
        return self.answers["nodes"]

    def services(self, filters):
        self.asked.append(("services", filters["label"]))
        return self.answers["services"]

    def tasks(self, filters):
        self.asked.append(("tasks", filters["desired-state"]))
        return self.answers["tasks"]

    def close(self):
        self.closed += 1


async def test_swarm_gpus_read_every_nodes_gpus_and_holders_from_the_manager(tmp_path):
    s = service(tmp_path, "ds01-ada--p", "ada")
    manager = FakeManager(
        [node("n1", ["GPU-n1-0000"]), node("n2", ["GPU-n2-0000"], state="down")],
        [s],
        [task(s["ID"], "GPU-n1-0000")],
    )
    gpus = swarm_gpus(LedgerSeal(tmp_path), client=lambda: manager)
    slots, ledger = await gpus.state()
    assert [x.uuid for x in slots] == ["GPU-n1-0000"]  # the down node's GPU cannot be given
    assert [(h.uuid, h.user) for h in ledger] == [("GPU-n1-0000", "ada")]
    assert [x.index for x in await gpus.slots()] == ["n1/0"]
    assert [h.container for h in await gpus.ledger()] == ["ds01-ada--p"]
    assert ("services", "ds01.managed=true") in manager.asked
    assert manager.closed == 3  # a client per read, closed after it


async def test_a_swarm_without_declared_gpus_has_none_to_give(tmp_path):
    manager = FakeManager([node("n1", [])], [], [])
    assert await swarm_gpus(LedgerSeal(tmp_path), client=lambda: manager).state() == (None, [])


async def test_a_claim_counts_until_the_swarm_shows_the_task_holding_its_gpu(tmp_path):
    s = service(tmp_path, "ds01-ada--p", "ada")
    manager = FakeManager([node("n1", ["GPU-n1-0000", "GPU-n1-0001"])], [s], [])
    gpus = swarm_gpus(LedgerSeal(tmp_path), client=lambda: manager)
    slot = GpuSlot("GPU-n1-0001", "n1/1", "A100", 0, 0, None)
    async with gpus.lock():
        gpus.claim(GpuRequest("ada", "p", "p", 1), [slot], "2026-12-02T10:00:00Z")
    assert [(h.uuid, h.container) for h in await gpus.ledger()] == [("GPU-n1-0001", "(starting)")]
    # the task runs, on the GPU the swarm chose: it replaces the claim, then the claim goes
    manager.answers["tasks"] = [task(s["ID"], "GPU-n1-0000")]
    assert [h.uuid for h in await gpus.ledger()] == ["GPU-n1-0001"]  # claimed: counted once
    gpus.settle("ada", "p")
    assert [(h.uuid, h.container) for h in await gpus.ledger()] == [("GPU-n1-0000", "ds01-ada--p")]

"""The swarm ledger and inventory, read from what the swarm API returns."""

from ds01_spawner import labels
from ds01_spawner.ledger import LedgerSeal
from ds01_spawner.swarmledger import gpu_slots, gpu_table, holders, node_gpus


def node(name: str, gpus: list[str], state: str = "ready", availability: str = "active"):
    return {
        "ID": f"id-{name}",
        "Description": {
            "Hostname": name,
            "Resources": {
                "GenericResources": [
                    {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": g}} for g in gpus
                ]
            },
        },
        "Spec": {
            "Availability": availability,
            "Labels": {"ds01.gpu.model": "A100", "ds01.gpu.memory": "81920"},
        },
        "Status": {"State": state, "Addr": f"198.18.0.{10 + int(name[1:])}"},
    }


def test_every_nodes_gpus_are_found_with_their_node_and_model():
    gpus = node_gpus([node("n1", ["GPU-n1-0001", "GPU-n1-0000"]), node("n2", ["GPU-n2-0000"])])
    assert [(g.node, g.uuid, g.index) for g in gpus] == [
        ("n1", "GPU-n1-0000", "n1/0"),
        ("n1", "GPU-n1-0001", "n1/1"),
        ("n2", "GPU-n2-0000", "n2/0"),
    ]
    assert gpus[0].model == "A100" and gpus[0].memory == 81920 * 1024 * 1024


def test_only_ready_active_nodes_gpus_can_be_given():
    gpus = node_gpus(
        [
            node("n1", ["GPU-n1-0000"]),
            node("n2", ["GPU-n2-0000"], state="down"),
            node("n3", ["GPU-n3-0000"], availability="drain"),
        ]
    )
    assert [s.uuid for s in gpu_slots(gpus)] == ["GPU-n1-0000"]


def service(tmp_path, name: str, user: str, sealed: bool = True, **extra):
    lab = {
        labels.MANAGED: "true",
        labels.ROLE: "project",
        labels.USER: user,
        labels.PROJECT: "p",
        labels.SERVER_NAME: "p",
        labels.GPU_UUIDS: "",
        **extra,
    }
    if sealed:
        lab[labels.GPU_SEAL] = LedgerSeal(tmp_path).seal(name, lab)
    return {"ID": f"s-{name}", "Spec": {"Name": name, "Labels": lab}}


def task(service_id: str, gpu: str, state: str = "running", desired: str = "running"):
    return {
        "ServiceID": service_id,
        "DesiredState": desired,
        "Status": {"State": state},
        "GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": gpu}}],
        "CreatedAt": "2026-12-02T10:00:00.123456Z",
    }


def test_a_sealed_services_live_task_holds_its_assigned_gpu(tmp_path):
    s = service(tmp_path, "ds01-ada--p", "ada")
    (h,) = holders([s], [task(s["ID"], "GPU-n2-0001")], seal=LedgerSeal(tmp_path))
    assert (h.uuid, h.user, h.project, h.container) == ("GPU-n2-0001", "ada", "p", "ds01-ada--p")


def test_unsealed_foreign_and_ended_tasks_hold_nothing(tmp_path):
    forged = service(tmp_path, "ds01-eve--p", "eve", sealed=False)
    real = service(tmp_path, "ds01-ada--p", "ada")
    tasks = [
        task(forged["ID"], "GPU-n1-0000"),
        task("someone-elses", "GPU-n1-0001"),
        task(real["ID"], "GPU-n2-0000", state="shutdown"),
        task(real["ID"], "GPU-n2-0001", desired="shutdown"),
    ]
    assert holders([forged, real], tasks, seal=LedgerSeal(tmp_path)) == []


def test_the_admin_table_names_node_gpu_and_holder(tmp_path):
    s = service(tmp_path, "ds01-ada--p", "ada")
    gpus = node_gpus([node("n1", ["GPU-n1-0000"]), node("n2", ["GPU-n2-0000"], state="down")])
    ledger = holders([s], [task(s["ID"], "GPU-n1-0000")])
    rows = gpu_table(gpus, ledger)
    assert [(r["node"], r["gpu"], r["state"], r["user"]) for r in rows] == [
        ("n1", "GPU-n1-0000", "held", "ada"),
        ("n2", "GPU-n2-0000", "unavailable", ""),
    ]

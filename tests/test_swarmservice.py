"""A server's swarm service request and its task's reading, pinned without a swarm."""

from ds01_spawner import labels
from ds01_spawner.container import ContainerPlan
from ds01_spawner.identity import UserIds
from ds01_spawner.limits import Limits
from ds01_spawner.swarmservice import (
    assigned_gpus,
    cpu_limit,
    fewest_cpus,
    pull_failed,
    service_request,
    task_endpoint,
    task_failure,
    task_stopped,
    unplaceable,
)

GIB = 1024**3
VAR = "DOCKER_RESOURCE_NVIDIA-GPU"


def seal(name: str, lab: dict[str, str]) -> str:
    return f"sealed:{name}"


def plan(**overrides) -> ContainerPlan:
    base = dict(
        owner="ada",
        server="thesis",
        project="thesis",
        project_type="base",
        image="198.18.0.1:5000/ds01-ada/thesis@sha256:abc",
        ids=UserIds(20001, 20001, "allocated"),
        workspace="/srv/ws/ada/thesis",
    )
    return ContainerPlan(**{**base, **overrides})


def request(p=None, **kwargs) -> dict:
    args = dict(
        name="ds01-ada--thesis",
        hub_env={"JUPYTERHUB_API_URL": "http://198.18.0.1:8081/hub/api", VAR: "GPU-fake"},
        args=["jupyterhub-singleuser"],
        port=8888,
        seal=seal,
        started_at="2026-12-02T10:00:00Z",
    )
    return service_request(p or plan(), **{**args, **kwargs})


def env_of(req: dict) -> dict[str, str]:
    return dict(e.split("=", 1) for e in req["task_template"]["ContainerSpec"]["Env"])


def test_the_service_runs_the_image_by_digest_as_the_user_without_capabilities():
    spec = request()["task_template"]["ContainerSpec"]
    assert spec["Image"] == "198.18.0.1:5000/ds01-ada/thesis@sha256:abc"
    assert spec["User"] == "20001:20001"
    assert spec["CapabilityDrop"] == ["ALL"]
    assert spec["Init"] is True


def test_the_workspace_is_bound_at_its_mount_point():
    (mount,) = request()["task_template"]["ContainerSpec"]["Mounts"]
    assert (mount["Source"], mount["Target"], mount["Type"]) == (
        "/srv/ws/ada/thesis",
        "/workspace",
        "bind",
    )


def test_service_labels_are_ds01s_and_sealed_with_the_service_name():
    lab = request()["labels"]
    assert lab[labels.USER] == "ada" and lab[labels.PROJECT] == "thesis"
    assert lab[labels.MANAGED] == "true" and lab[labels.ROLE] == "project"
    assert lab[labels.GPU_UUIDS] == ""  # the swarm has not assigned one yet
    assert lab[labels.GPU_SEAL] == "sealed:ds01-ada--thesis"


def test_a_gpu_is_asked_of_the_swarm_as_a_generic_resource():
    req = request(gpus=1)
    reserved = req["task_template"]["Resources"]["Reservations"]["GenericResources"]
    assert reserved == [{"DiscreteResourceSpec": {"Kind": "NVIDIA-GPU", "Value": 1}}]
    env = env_of(req)
    assert VAR not in env  # the swarm's value must be the only one
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert "CUDA_VISIBLE_DEVICES" not in env


def test_without_a_gpu_the_swarm_variable_is_empty_and_nothing_is_reserved():
    req = request()
    assert "Reservations" not in req["task_template"].get("Resources", {})
    assert env_of(req)[VAR] == ""
    assert env_of(req)["NVIDIA_VISIBLE_DEVICES"] == "void"


def test_the_hubs_environment_and_ds01s_reach_the_task():
    env = env_of(request())
    assert env["JUPYTERHUB_API_URL"] == "http://198.18.0.1:8081/hub/api"
    assert env["DS01_PROJECT"] == "thesis"


def test_the_task_is_never_restarted_or_moved():
    assert request()["task_template"]["RestartPolicy"]["Condition"] == "none"


def test_the_port_is_published_in_host_mode_the_engine_choosing_its_number():
    (port,) = request()["endpoint_spec"]["Ports"]
    assert port == {"Protocol": "tcp", "TargetPort": 8888, "PublishMode": "host"}


def test_policy_limits_become_service_limits():
    limits = Limits(memory=4 * GIB, max_cpus=2.5, pids_limit=512)
    res = request(plan(limits=limits))["task_template"]["Resources"]["Limits"]
    assert res == {"MemoryBytes": 4 * GIB, "NanoCPUs": 2_500_000_000, "Pids": 512}


def test_a_cpu_limit_above_the_smallest_node_is_capped_there_for_nodes_refuse_it():
    limits = Limits(max_cpus=4)
    res = request(plan(limits=limits), node_cpus=2_000_000_000)["task_template"]["Resources"]
    assert res["Limits"]["NanoCPUs"] == 2_000_000_000
    assert cpu_limit(1.5, 2_000_000_000) == 1_500_000_000
    assert cpu_limit(None, 2_000_000_000) is None
    assert cpu_limit(3, None) == 3_000_000_000


def test_the_fewest_cpus_are_those_of_the_smallest_ready_node():
    def node(cpus: int, state: str = "ready") -> dict:
        return {"Description": {"Resources": {"NanoCPUs": cpus}}, "Status": {"State": state}}

    nodes = [node(8_000_000_000), node(2_000_000_000, "down"), node(4_000_000_000)]
    assert fewest_cpus(nodes) == 4_000_000_000
    assert fewest_cpus([{"Status": {"State": "ready"}}]) is None


def test_placement_constraints_are_passed_on():
    req = request(constraints=["node.hostname==n2"])
    assert req["task_template"]["Placement"]["Constraints"] == ["node.hostname==n2"]


def gpu(value: str) -> dict:
    return {"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": value}}


def test_assigned_gpus_are_read_from_the_task():
    assert assigned_gpus({"GenericResources": [gpu("GPU-n2-0001")]}) == ["GPU-n2-0001"]
    assert assigned_gpus({"AssignedGenericResources": [gpu("GPU-n1-0000")]}) == ["GPU-n1-0000"]
    assert assigned_gpus({}) == []


def test_a_task_pending_on_insufficient_resources_is_unplaceable():
    err = "no suitable node (insufficient resources on 2 nodes)"
    assert unplaceable({"Status": {"State": "pending", "Err": err}}) == err
    assert unplaceable({"Status": {"State": "pending"}}) == ""
    assert unplaceable({"Status": {"State": "running"}}) == ""


def test_a_rejected_or_failed_task_has_failed():
    assert task_failure({"Status": {"State": "rejected", "Err": "no such image"}}).startswith(
        "rejected: no such image"
    )
    assert task_failure({"Status": {"State": "starting"}}) == ""


RUNNING = {"DesiredState": "running", "Status": {"State": "running"}}
READY = {"Status": {"State": "ready", "Addr": "198.18.0.12"}, "Spec": {"Availability": "active"}}


def test_a_running_task_on_a_ready_node_has_not_stopped():
    assert task_stopped(RUNNING, READY) == ""


def test_a_dead_or_drained_node_stops_its_server():
    down = {**READY, "Status": {"State": "down"}, "Description": {"Hostname": "n2"}}
    assert task_stopped(RUNNING, down) == "its node n2 is down"
    drained = {**READY, "Spec": {"Availability": "drain"}, "Description": {"Hostname": "n2"}}
    assert task_stopped(RUNNING, drained) == "its node n2 is drained"


def test_a_task_the_swarm_shut_down_or_that_is_gone_has_stopped():
    assert "shut its task down" in task_stopped({**RUNNING, "DesiredState": "shutdown"}, READY)
    assert task_stopped(None, None) == "its service is gone"


def test_the_endpoint_is_the_nodes_address_and_the_published_port():
    task = {"Status": {"PortStatus": {"Ports": [{"TargetPort": 8888, "PublishedPort": 30001}]}}}
    assert task_endpoint(task, READY, 8888) == ("198.18.0.12", 30001)


def test_a_task_whose_node_could_not_pull_its_image_is_told_apart():
    err = "No such image: 198.18.0.1:5000/ds01-ada/thesis@sha256:0123"
    assert pull_failed({"Status": {"State": "rejected", "Err": err}})
    assert not pull_failed({"Status": {"State": "rejected", "Err": "starting container failed"}})
    assert not pull_failed({"Status": {"State": "preparing", "Err": err}})

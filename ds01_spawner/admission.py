"""May this request start? One pure decision from plain facts the spawner gathers.

`admit` checks, in order: the project is not already running in another of
the user's servers, its type is allowed, the user is under
`max_running_projects`, and (when GPUs are asked for and their facts given)
`gpus.choose` would hand some out now. It raises a `Refusal` carrying the
HTTP status, and changes nothing: the GPUs are taken later, under the
allocator's lock, by `GpuAllocator.allocate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import Refusal
from .gpus import GpuPolicy, GpuRefusal, GpuRequest, GpuShortage, choose
from .ledger import Hold, Holder
from .limits import Limits
from .nvml import GpuSlot, GpuUnavailable
from .projects import ProjectRequest


@dataclass(frozen=True)
class GpuFacts:
    """What the GPUs look like now: NVML's slots, the ledger, the holds, the user's rules."""

    slots: list[GpuSlot] | None  # None: NVML could not be read (no usable GPUs)
    ledger: list[Holder]
    policy: GpuPolicy
    holds: list[Hold] = field(default_factory=list)


@dataclass(frozen=True)
class Facts:
    """Everything `admit` needs to know about the user and the hub, gathered beforehand."""

    user: str
    server: str  # the named server ("" for the default one)
    limits: Limits
    # project -> the user's other server it runs in ("" for the default server):
    # servers that are running or starting
    running: Mapping[str, str] = field(default_factory=dict)
    gpus: GpuFacts | None = None  # None: not checked now (no GPU asked, or checked later)


def admit(request: ProjectRequest, facts: Facts) -> None:
    """Refuse `request` (a `Refusal` with its status) if it may not start now."""
    if request.name in facts.running:
        server = facts.running[request.name]
        where = f"server {server!r}" if server else "your default server"
        raise Refusal(
            f"project {request.name!r} is already running in {where}; open or stop it there",
            status=409,
            reason="project_in_use",
        )
    limits = facts.limits
    if not limits.allows_type(request.type):
        allowed = ", ".join(limits.allowed_types or ()) or "none"
        raise Refusal(
            f"project type {request.type!r} is not allowed for you (allowed_types: "
            f"{allowed}); choose another type, or ask the hub's admin",
            status=403,
            reason="policy",
        )
    check_running_projects(limits, sorted(facts.running))
    if request.gpus and facts.gpus is not None:
        check_gpus(gpu_request(request, facts.user, facts.server), facts.gpus, request.wait)


def check_running_projects(limits: Limits, running: list[str]) -> None:
    """`max_running_projects`: refuse one more while the user runs that many."""
    cap = limits.max_running_projects
    if cap is None or len(running) < cap:
        return
    noun = "project" if len(running) == 1 else "projects"
    advice = (
        f"stop one of {', '.join(running)} first" if running else "ask the hub's admin for more"
    )
    raise Refusal(
        f"you run {len(running)} {noun}, your limit is {cap} (max_running_projects): {advice}",
        status=409,
        reason="policy",
    )


def gpu_request(request: ProjectRequest, user: str, server: str) -> GpuRequest:
    """The GPU side of `user`'s project request for `server`."""
    return GpuRequest(user, request.name, server, request.gpus, request.mig)


def check_gpus(request: GpuRequest, gpus: GpuFacts, may_wait: bool = False) -> list[GpuSlot]:
    """The GPUs `choose` would give now, or a 409 Refusal saying why there are none;
    none for now is no refusal for a request that `may_wait` in the GPU queue."""
    if gpus.slots is None:
        raise gpu_refusal(GpuUnavailable("NVML cannot be read"))
    try:
        return choose(gpus.slots, gpus.ledger, request, gpus.policy, gpus.holds)
    except GpuShortage as e:
        if may_wait:
            return []
        raise gpu_refusal(e) from None
    except GpuRefusal as e:
        raise gpu_refusal(e) from None


def gpu_refusal(e: GpuRefusal | GpuUnavailable) -> Refusal:
    """No GPU: a 409 when they are taken (try again later), a 503 when this server has
    none usable; the same from admission and from allocation."""
    if isinstance(e, GpuUnavailable):
        return Refusal(
            f"this server has no usable GPUs ({e}); start without a GPU", status=503, reason="gpu"
        )
    wait = (
        " Or wait for one: tick 'Wait for a GPU' (user_options wait: true)."
        if isinstance(e, GpuShortage) and "wait" not in str(e)
        else ""
    )
    return Refusal(f"no GPU for you right now: {e}{wait}", status=409, reason="gpu")

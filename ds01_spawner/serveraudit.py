"""A server's events in the audit trail, as DS01Spawner writes them (a mixin).

What each event says is built by plain functions (`ledger.gpu_audit_fields`,
`audit.seconds_since`); this only reads the spawner's state (its user,
server name, plan, container) and hands the fields to `audit.AuditLog`,
which never raises or waits.
"""

from __future__ import annotations

import socket
from typing import Any

from . import labels
from .audit import seconds_since
from .container import ContainerPlan
from .errors import Refusal
from .ledger import gpu_audit_fields, gpu_labels
from .policyfile import PolicyError


class ServerAudit:
    """The audit hooks of DS01Spawner: start, stop, GPU grant and release, refusals."""

    # provided by DS01Spawner (JupyterHub's Spawner and DS01Settings)
    user: Any
    name: str
    audit: Any
    policy_store: Any
    object_name: str
    image: str
    user_options: Any

    def _audit(self, kind: str, plan: ContainerPlan | None, **data: Any) -> None:
        """One event of this server in the audit trail (audit.py: never raises or waits)."""
        fields = {"project": plan.project if plan else None, **data}
        self.audit.emit(kind, user=self.user.name, server=self.name, **fields)

    def _audit_created(self, plan: ContainerPlan | None) -> None:
        """The container exists: its start, and the GPUs its ledger labels give it."""
        self._audit("server", plan, action="start", container=self.object_name, image=self.image)
        if gpus := gpu_audit_fields(self._plan_labels(plan)):
            group = self._policy_group()
            self._audit("gpu", plan, action="grant", group=group, node=socket.gethostname(), **gpus)

    def _audit_stopped(self, plan: ContainerPlan | None, name: str, held: dict[str, str]) -> None:
        """The container is gone: its stop (how long it ran), and its GPUs' release."""
        ran = seconds_since(held.get(labels.STARTED_AT))
        self._audit("server", plan, action="stop", container=name, seconds=ran)
        if gpus := gpu_audit_fields(held):
            self._audit("gpu", plan, action="release", node=socket.gethostname(), **gpus)

    def _audit_refusal(self, e: Refusal) -> None:
        options = self.user_options if isinstance(self.user_options, dict) else {}
        project = options.get("project")
        self._audit(
            "refusal",
            None,
            project=project if isinstance(project, str) else None,
            reason=e.reason or "refused",
            status=e.status,
            message=e.message,
        )

    @staticmethod
    def _plan_labels(plan: ContainerPlan | None) -> dict[str, str]:
        """The ledger labels a plan gives its container (none after a hub restart: the
        plan it keeps holds no GPUs, the container's labels do)."""
        return gpu_labels(list(plan.gpus), plan.gpus_since) if plan and plan.gpus else {}

    def _policy_group(self) -> str | None:
        """The policy group the user's limits come from, if any."""
        try:
            return self.policy_store.current().group_for(g.name for g in self.user.groups)
        except PolicyError:
            return None

"""The project picker (JupyterHub's spawn options form): what it offers, and its page.

`gpu_choices` is the pure part: from the user's limits and the GPUs as they
are now, how many whole GPUs (or a MIG slice) the picker offers and what it
says about them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from . import labels
from .ledger import Holder
from .limits import Limits
from .nvml import GpuSlot

_templates = Environment(
    loader=PackageLoader("ds01_spawner", "templates"), autoescape=select_autoescape()
)


def gpu_choices(
    limits: Limits,
    slots: list[GpuSlot] | None,
    ledger: Iterable[Holder],
    *,
    reserved: Iterable[str] = (),
    offer_mig: bool = False,
) -> dict[str, Any]:
    """What the picker offers: up to `max` whole GPUs, MIG, and how many are free now.

    `slots` None: the server has no usable GPUs (NVML failed).
    """
    limit = limits.max_gpus
    if limits.max_gpus_per_project is not None:
        limit = min(limit, limits.max_gpus_per_project)
    if limit <= 0:
        return {"max": 0, "mig": False, "note": ""}
    if slots is None:
        return {"max": 0, "mig": False, "note": "This server has no usable GPUs."}
    hidden = set(reserved)
    whole = [s for s in slots if not s.is_mig and s.uuid not in hidden]
    held = {h.uuid for h in ledger}
    free = sum(s.uuid not in held for s in whole)
    return {
        "max": min(int(limit), len(whole)) if limits.allow_full_gpu else 0,
        "mig": offer_mig and any(s.is_mig for s in slots),
        "note": f"{free} of {len(whole)} GPUs free right now; your limit is {limit:g}.",
    }


def built_projects(images: Iterable[dict[str, Any]]) -> dict[str, str]:
    """project -> when its `:latest` image was built, from the engine's image list."""
    built = {}
    for image in images:
        project = (image.get("Labels") or {}).get(labels.PROJECT)
        if project and any(t.endswith(":latest") for t in image.get("RepoTags") or []):
            built[project] = time.strftime("%Y-%m-%d %H:%M", time.localtime(image["Created"]))
    return built


def render_picker(**namespace: Any) -> str:
    """The form's HTML (templates/options_form.html); JupyterHub wraps it in its <form>."""
    return _templates.get_template("options_form.html").render(**namespace)

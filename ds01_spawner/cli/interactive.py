"""`image-update` with no options in a terminal: the lab tool's menu, over the same calls.

Each choice is one call to the service (its refusal is printed and the menu
goes on, nothing changed); a rebuild streams its log and then offers the
restart, as the scriptable form does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import display
from .api import ServiceError

if TYPE_CHECKING:
    from .commands import Terminal

MENU = """
  1) add pip packages        4) remove packages
  2) add Debian (apt) packages  5) rebuild the image
  3) import a requirements file 6) rebuild without cache
  7) add the packages lost at the last retire
  q) quit"""


def _words(text: str) -> list[str]:
    return [w for w in text.replace(",", " ").split() if w]


def image_update_menu(t: Terminal, project: str) -> int:
    from .commands import EXIT_FAILED, EXIT_OK, follow_build, offer_restart, read_requirements

    path = t.service.project_path("images", project)
    while True:
        info = t.service.get(path)
        t.say(display.packages(info))
        t.say(MENU)
        choice = t.ask("choice> ").strip().lower()
        edit: dict[str, object] = {}
        try:
            if choice in ("q", "quit", "exit", ""):
                return EXIT_OK
            if choice == "1":
                edit["add_pip"] = _words(t.ask("pip packages (e.g. transformers==4.*): "))
            elif choice == "2":
                edit["add_apt"] = _words(t.ask("Debian packages: "))
            elif choice == "3":
                edit["requirements"] = read_requirements(t.ask("requirements file: ").strip())
            elif choice == "4":
                names = _words(t.ask("packages to remove (pip or apt names): "))
                managed = info.get("packages") or {}
                apt = set(managed.get("apt") or [])
                edit["remove_apt"] = [n for n in names if n in apt]
                edit["remove_pip"] = [n for n in names if n not in apt]
            elif choice == "7":
                edit["add_pip"] = display.lost(info)
                if not edit["add_pip"]:
                    t.say("The last session installed nothing that was lost.")
                    continue
            elif choice in ("5", "6"):
                result = t.service.post(f"{path}/rebuild", {"nocache": choice == "6"})
                t.say(result["message"])
                if not follow_build(t, project):
                    t.say("The build failed: the previous image stays in use.")
                    return EXIT_FAILED
                return offer_restart(t, project, yes=False, no=False)
            else:
                t.say(f"No choice {choice!r}.")
                continue
            if any(edit.values()):
                result = t.service.post(f"{path}/packages", edit)
                t.say(result["message"])
        except ServiceError as e:
            if e.status == 0:
                raise
            t.say(f"Refused: {e.message} (nothing changed)")

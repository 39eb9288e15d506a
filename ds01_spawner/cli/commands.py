"""image-update, image-list, project, container retire, check-limits: parse, call, print.

One `main(argv, program)` for every name the commands are installed under
(the base image links each name to one launcher). Exit codes say what
happened: `EXIT_*` below, and ``--help`` lists them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import urljoin

from . import display
from .api import Service, ServiceError

EXIT_OK = 0
EXIT_REFUSED = 1  # the service said no (any HTTP error): the message says why
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3  # not in a ds01 server, or the service did not answer
EXIT_FAILED = 4  # a build or a start failed
EXIT_INTERRUPTED = 130

EXIT_CODES = f"""exit codes: {EXIT_OK} done, {EXIT_REFUSED} refused (nothing changed), \
{EXIT_USAGE} usage, {EXIT_UNREACHABLE} the ds01 service is out of reach, \
{EXIT_FAILED} a build or start failed"""


class Terminal:
    """Where a command reads and writes, and the server it runs in (from its environment)."""

    def __init__(
        self,
        service: Service,
        environ: Mapping[str, str],
        out: TextIO | None = None,
        err: TextIO | None = None,
        ask: Callable[[str], str] = input,
        interactive: bool | None = None,
    ) -> None:
        self.service = service
        self.environ = environ
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.ask = ask
        self.interactive = sys.stdin.isatty() if interactive is None else interactive

    @property
    def project(self) -> str:
        """The project of the server this terminal runs in ("" outside one)."""
        return self.environ.get("DS01_PROJECT", "")

    @property
    def server(self) -> str:
        return self.environ.get("JUPYTERHUB_SERVER_NAME", "")

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def json(self, data: Any) -> None:
        print(json.dumps(data, indent=1), file=self.out, flush=True)

    def confirm(self, question: str, yes: bool) -> bool:
        if yes:
            return True
        if not self.interactive:
            return False
        return self.ask(f"{question} [y/N] ").strip().lower() in ("y", "yes")

    def url(self, path: str) -> str:
        """A hub path as a link: the hub's public address where the server knows it."""
        public = self.environ.get("JUPYTERHUB_PUBLIC_HUB_URL") or self.environ.get(
            "JUPYTERHUB_PUBLIC_URL"
        )
        return urljoin(public, path) if public else path

    def here(self, server: str) -> bool:
        """Is `server` the one this terminal runs in?"""
        return "JUPYTERHUB_SERVER_NAME" in self.environ and server == self.server


# ---------------------------------------------------------------- shared steps


def follow_build(t: Terminal, project: str, *, show: bool = True) -> bool:
    """Print the project's build log as it comes (`show`); True if the image was built."""
    ok = None
    for event in t.service.events(t.service.project_path("images", project, "events")):
        line = display.build_event(event)
        if line and show:
            t.say(line)
        if event.get("phase") in display.BUILD_DONE:
            ok = display.BUILD_DONE[event["phase"]]
    if ok is None and show:
        t.say("The build log ended without a result; see the image page.")
    return bool(ok)


def follow_start(t: Terminal, project: str, *, show: bool = True) -> tuple[bool, str]:
    """Print a server's start as it comes (`show`): (ready?, the last message)."""
    last = ""
    for event in t.service.events(t.service.project_path("projects", project, "progress")):
        line = display.start_event(event)
        if line:
            last = str(event.get("message") or "")
            if show:
                t.say(line)
        if event.get("ready"):
            return True, last
        if event.get("failed"):
            return False, last
    return False, last or "the start's progress stream ended early"


def launch(t: Terminal, project: str, body: dict[str, Any], *, wait: bool, as_json: bool) -> int:
    """Start (`body["create"]`: create) a project's server; follow it unless told not to."""
    if not body.get("create") and not as_json:
        show_rebuild(t, project)
    result = t.service.post(t.service.project_path("projects", project, "launch"), body)
    url = t.url(result["url"])
    if result["status"] in ("starting", "waiting") and wait:
        if not as_json:
            t.say(result["message"])
        ready, last = follow_start(t, project, show=not as_json)
        result["status"] = "ready" if ready else "failed"
        result["message"] = f"{project} is ready" if ready else last
    if as_json:
        t.json({**result, "url": url})
    elif result["status"] == "failed":
        t.say(f"{project} did not start: {result['message']}")
    else:
        t.say(f"{result['message']}. Open it at {url}")
    return EXIT_FAILED if result["status"] == "failed" else EXIT_OK


def show_rebuild(t: Terminal, project: str) -> None:
    """A rebuild of the project's image running now: its log, since the start waits for it."""
    try:
        info = t.service.get(t.service.project_path("images", project))
    except ServiceError:
        return  # no such project, say: the launch itself says so
    if (info.get("build") or {}).get("status") == "running":
        t.say(f"The image of {project} is being rebuilt; its start waits for the build:")
        follow_build(t, project)


def offer_restart(t: Terminal, project: str, yes: bool, no: bool) -> int:
    """After a rebuild: restart the project's server into the new image, if it runs."""
    info = t.service.get(t.service.project_path("images", project))
    servers = [s.get("server", "") for s in info.get("running") or []]
    if not servers or no:
        if servers:
            t.say(f"Restart to use it: image-update {project} --restart")
        else:
            t.say(f"Start it to use the new image: project launch {project}")
        return EXIT_OK
    here = any(t.here(s) for s in servers)
    question = (
        f"Restart {project} into the new image now? Its container is replaced and "
        "/workspace kept" + ("; this terminal closes." if here else ".")
    )
    if not t.confirm(question, yes):
        t.say(f"Not restarted. Later: image-update {project} --restart")
        return EXIT_OK
    if here:
        t.say("Restarting: this terminal closes now; open the server again in a moment.")
    result = t.service.post(t.service.project_path("images", project, "restart"))
    t.say(result.get("message", "Restarting."))
    return EXIT_OK


# ---------------------------------------------------------------- the commands


def image_update(t: Terminal, args: argparse.Namespace) -> int:
    project = args.project or t.project or choose_project(t)
    if not project:
        print("Which project? image-update PROJECT (image-list shows yours)", file=t.err)
        return EXIT_USAGE
    path = t.service.project_path("images", project)
    edits: dict[str, Any] = {}
    if args.add:
        edits["add_pip"] = args.add
    if args.apt:
        edits["add_apt"] = args.apt
    if args.requirements:
        edits["requirements"] = read_requirements(args.requirements)
    if args.remove:
        edits["remove_pip"] = args.remove
    if args.remove_apt:
        edits["remove_apt"] = args.remove_apt
    rebuild = args.rebuild or args.no_cache
    if not edits and not rebuild and not args.restart:
        if t.interactive and not args.json and not args.list:
            from .interactive import image_update_menu

            return image_update_menu(t, project)
        info = t.service.get(path)
        t.json(info) if args.json else t.say(display.packages(info))
        return EXIT_OK
    results: dict[str, Any] = {"project": project}
    if edits:
        results["packages"] = t.service.post(f"{path}/packages", edits)
        if not args.json:
            t.say(results["packages"]["message"].replace(": rebuild to use them", ""))
    if rebuild:
        results["rebuild"] = t.service.post(f"{path}/rebuild", {"nocache": args.no_cache})
        if not args.json:
            t.say(results["rebuild"]["message"])
        built = follow_build(t, project, show=not args.json)
        results["built"] = built
        if not built:
            if args.json:
                t.json(results)
            else:
                t.say("The build failed: the previous image stays in use. Fix and rebuild.")
            return EXIT_FAILED
    if args.restart and not rebuild:
        results["restart"] = t.service.post(f"{path}/restart")
        if args.json:
            t.json(results)
        else:
            t.say(results["restart"]["message"])
        return EXIT_OK
    if args.json:
        t.json(results)
        return EXIT_OK
    if rebuild:
        return offer_restart(t, project, yes=args.yes or args.restart, no=args.no_restart)
    t.say(f"Rebuild to use them: image-update {project} --rebuild")
    return EXIT_OK


def read_requirements(name: str) -> str:
    """A requirements file's text (``-``: standard input); the service parses it."""
    if name == "-":
        return sys.stdin.read(256 * 1024)
    try:
        with open(name, encoding="utf-8") as f:
            return f.read(256 * 1024 + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise ServiceError(f"cannot read {name}: {e}", 400) from None


def choose_project(t: Terminal) -> str:
    """Ask which project, when run outside a project's server in a terminal."""
    if not t.interactive:
        return ""
    projects = t.service.get("api/images").get("projects") or []
    if not projects:
        return ""
    for i, p in enumerate(projects, 1):
        t.say(f"  {i}) {p['project']} ({p.get('type')})")
    answer = t.ask("Project (number or name): ").strip()
    if answer.isdigit() and 1 <= int(answer) <= len(projects):
        return projects[int(answer) - 1]["project"]
    return answer


def image_list(t: Terminal, args: argparse.Namespace) -> int:
    projects = t.service.get("api/images").get("projects") or []
    t.json(projects) if args.json else t.say(display.image_list(projects))
    return EXIT_OK


def project(t: Terminal, args: argparse.Namespace) -> int:
    if args.action == "list":
        projects = t.service.get("api/images").get("projects") or []
        if args.json:
            t.json(projects)
        else:
            user = t.service.user

            def url_of(server: str) -> str:
                return t.url(f"{t.environ.get('JUPYTERHUB_BASE_URL', '/')}user/{user}/{server}/")

            t.say(display.project_list(projects, url_of))
        return EXIT_OK
    body: dict[str, Any] = {}
    if args.gpu is not None:
        body["gpus"] = args.gpu if args.gpu == "mig" else int(args.gpu)
        if args.queue:
            body["wait"] = True
    if args.action == "init":
        body["create"] = True
        if args.type:
            body["type"] = args.type
    return launch(t, args.name, body, wait=not args.no_wait, as_json=args.json)


def container_retire(t: Terminal, args: argparse.Namespace) -> int:
    project = args.project or t.project
    if not project:
        print("Which project? container retire PROJECT (project list shows what runs)", file=t.err)
        return EXIT_USAGE
    info = t.service.get(t.service.project_path("images", project))
    servers = [s.get("server", "") for s in info.get("running") or []]
    here = any(t.here(s) for s in servers)
    if here and not args.json:
        lost = display.lost(info)
        t.say(
            f"Retiring {project}: its container is removed (this terminal closes), "
            "/workspace and the image are kept."
        )
        if args.save_packages:
            t.say("Packages pip-installed in this session are added to the image as it stops.")
        elif lost:
            t.say("Packages installed here are lost; keep them with --save-packages.")
    body = {"save_packages": args.save_packages, "rebuild": not args.no_rebuild}
    result = t.service.post(t.service.project_path("projects", project, "retire"), body)
    if args.json:
        t.json(result)
        return EXIT_OK
    t.say(result["message"])
    if result.get("rebuilding") and args.wait:
        ok = follow_build(t, project)
        if not ok:
            return EXIT_FAILED
        t.say(f"Start it again on the new image: project launch {project}")
    elif result.get("rebuilding"):
        t.say(f"`project launch {project}` starts it once the rebuild is done.")
    return EXIT_OK


def check_limits(t: Terminal, args: argparse.Namespace) -> int:
    data = t.service.get("api/limits")
    t.json(data) if args.json else t.say(display.limits(data))
    return EXIT_OK


# ---------------------------------------------------------------- arguments


def parser(program: str) -> argparse.ArgumentParser:
    """The arguments of `program` (the name the command was called by)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the service's JSON answer")
    kw: dict[str, Any] = {"epilog": EXIT_CODES, "parents": [common]}
    if program == "image-update":
        p = argparse.ArgumentParser(
            "image-update",
            description="Change a project's image: add or remove packages, rebuild, restart "
            "into it. With no options in a terminal: a menu. A package installed with "
            "`pip install` in a running container is gone at retire; put it in the image.",
            **kw,
        )
        p.add_argument("project", nargs="?", help="the project (default: this server's)")
        p.add_argument("--add", action="append", metavar="SPEC", help="add a pip package")
        p.add_argument("--apt", action="append", metavar="PKG", help="add a Debian package")
        p.add_argument("--requirements", metavar="FILE", help="add a requirements.txt ('-': stdin)")
        p.add_argument("--remove", action="append", metavar="NAME", help="remove a pip package")
        p.add_argument(
            "--remove-apt", action="append", metavar="PKG", help="remove a Debian package"
        )
        p.add_argument(
            "--rebuild", action="store_true", help="rebuild the image and follow its log"
        )
        p.add_argument("--no-cache", action="store_true", help="rebuild from scratch")
        p.add_argument("--restart", action="store_true", help="restart the server into the image")
        p.add_argument("--no-restart", action="store_true", help="do not offer to restart")
        p.add_argument("--list", action="store_true", help="list the image's packages only")
        p.add_argument("--yes", "-y", action="store_true", help="restart without asking")
        return p
    if program == "image-list":
        return argparse.ArgumentParser(
            "image-list", description="Your projects' images and their state.", **kw
        )
    if program == "check-limits":
        return argparse.ArgumentParser(
            "check-limits",
            description="Your limits, what you use, and when each server would be retired.",
            **kw,
        )
    if program == "container":
        p = argparse.ArgumentParser(
            "container", description="Manage your project containers.", epilog=EXIT_CODES
        )
        sub = p.add_subparsers(dest="action", required=True, metavar="retire")
        r = sub.add_parser(
            "retire",
            parents=[common],
            epilog=EXIT_CODES,
            description="Stop a project's server: the container is removed, /workspace and "
            "the image are kept, its GPU freed. --save-packages first puts what this "
            "session pip-installed into the image (and rebuilds it).",
        )
        r.add_argument("project", nargs="?", help="the project (default: this server's)")
        r.add_argument("--save-packages", action="store_true", help="keep pip-installed packages")
        r.add_argument("--no-rebuild", action="store_true", help="save the packages, build later")
        r.add_argument("--wait", action="store_true", help="follow the rebuild (another server)")
        return p
    if program == "project":
        p = argparse.ArgumentParser(
            "project", description="Your projects: list, create, start.", epilog=EXIT_CODES
        )
        sub = p.add_subparsers(dest="action", required=True, metavar="list|init|launch")
        sub.add_parser("list", parents=[common], help="your projects and what runs")
        for name, text in (
            ("init", "create a project (its workspace and image) and start it"),
            ("launch", "start a project (building its image first if it has none)"),
        ):
            s = sub.add_parser(
                name, parents=[common], help=text, description=text, epilog=EXIT_CODES
            )
            s.add_argument("name", help="the project's name: lowercase letters, digits, -")
            if name == "init":
                s.add_argument("--type", help="the project type (its Dockerfile template)")
            s.add_argument("--gpu", choices=["0", "1", "2", "3", "4", "mig"], help="GPUs to take")
            s.add_argument(
                "--queue",
                action="store_true",
                help="no GPU free: wait in the GPU queue (first come, first served)",
            )
            s.add_argument("--no-wait", action="store_true", help="do not follow the start")
        return p
    raise SystemExit(f"ds01: unknown command {program!r}")


COMMANDS: dict[str, Callable[[Terminal, argparse.Namespace], int]] = {
    "image-update": image_update,
    "image-list": image_list,
    "project": project,
    "container": container_retire,
    "check-limits": check_limits,
}


def main(argv: Sequence[str] | None = None, program: str | None = None) -> int:
    """Run `program` (default: the name this was called by) with `argv`."""
    program = program or os.path.basename(sys.argv[0])
    if program in ("ds01", "__main__.py") and argv is None and len(sys.argv) > 1:
        program, argv = sys.argv[1], sys.argv[2:]
    if program not in COMMANDS:
        print(f"ds01 commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    args = parser(program).parse_args(argv)
    try:
        t = Terminal(Service.from_environ(os.environ), os.environ)
        return COMMANDS[program](t, args)
    except ServiceError as e:
        if getattr(args, "json", False):
            print(json.dumps({"status": e.status, "message": e.message}))
        print(f"{program}: {e.message}", file=sys.stderr)
        return EXIT_REFUSED if e.status else EXIT_UNREACHABLE
    except (KeyboardInterrupt, EOFError):  # Ctrl-C, or Ctrl-D at a question
        print(file=sys.stderr)
        return EXIT_INTERRUPTED

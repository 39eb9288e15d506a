"""The managed sections of a project's Dockerfile, edited structurally.

A project's Dockerfile is the researcher's own file. The image-update page owns
only two sections of it, each between a pair of marker comments::

    # >>> ds01 managed: apt packages (edited by the image-update page)
    RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y ...
    # <<< ds01 managed: apt packages

    # >>> ds01 managed: pip packages (edited by the image-update page)
    RUN ["pip", "install", "--no-cache-dir", "numpy<2,>=1.24"]
    # <<< ds01 managed: pip packages

Nothing is edited by pattern substitution: a Dockerfile is read into the
packages it manages (refusing any line the page did not write), the package
list is changed, and the sections are written again from that list. Every
byte outside the sections is kept as it was.

Each package is its own ``RUN``, so Docker's layer cache rebuilds only from
the first changed line: adding a package at the end costs one layer. pip lines
use the exec (JSON) form, so no shell ever reads a spec (``numpy>=1.24`` is no
redirection, ``transformers==4.*`` no glob). apt lines need a shell for ``&&``;
apt names are validated to Debian's strict alphabet, so that is safe.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .packages import (
    PackageError,
    apt_name,
    pip_name,
    validate_apt_package,
    validate_pip_spec,
)

APT_START = "# >>> ds01 managed: apt packages (edited by the image-update page)"
APT_END = "# <<< ds01 managed: apt packages"
PIP_START = "# >>> ds01 managed: pip packages (edited by the image-update page)"
PIP_END = "# <<< ds01 managed: pip packages"
_MARKERS = (APT_START, APT_END, PIP_START, PIP_END)
_MARKER_PREFIXES = ("# >>> ds01 managed", "# <<< ds01 managed")

# Each package is a layer. overlay2 refuses images deeper than about 125
# layers ("max depth exceeded", seen with the classic builder on a 3-layer
# base after 122 RUNs); this leaves room for the base image's layers and the
# researcher's own instructions.
MAX_MANAGED_PACKAGES = 90

_APT_PREFIX = (
    "RUN apt-get update && DEBIAN_FRONTEND=noninteractive "
    "apt-get install -y --no-install-recommends "
)
_APT_SUFFIX = " && rm -rf /var/lib/apt/lists/*"
_PIP_COMMAND = ["pip", "install", "--no-cache-dir"]

# A parser directive at the very top of a Dockerfile, e.g. "# escape=`".
_DIRECTIVE = re.compile(r"#\s*([A-Za-z][A-Za-z0-9]*)\s*=\s*(\S*)\s*")


class DockerfileError(ValueError):
    """A Dockerfile whose managed sections cannot be read or changed safely."""


def check_package_count(count: int, what: str = "packages") -> None:
    """Refuse more packages than the managed sections may hold.

    Called before any package is validated or compared, so that a request
    naming thousands of packages costs a count, not thousands of parses.
    """
    if count > MAX_MANAGED_PACKAGES:
        raise DockerfileError(
            f"{count} {what} is more than the {MAX_MANAGED_PACKAGES} the image-update page "
            "manages: each is a layer of the image, and Docker cannot run images with more "
            "than about 125 layers; remove packages you do not need"
        )


@dataclass(frozen=True)
class ManagedPackages:
    """The packages the managed sections install, in Dockerfile order: apt
    entries as ``name`` or ``name=version``, pip entries as normalized specs."""

    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("apt", "pip"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                raise TypeError(f"ManagedPackages.{field_name} takes a sequence of packages")
            object.__setattr__(self, field_name, tuple(value))


def render_apt_line(package: str) -> str:
    """The one ``RUN`` line that installs an apt package."""
    return f"{_APT_PREFIX}{validate_apt_package(package)}{_APT_SUFFIX}"


def render_pip_line(spec: str) -> str:
    """The one exec-form ``RUN`` line that installs a pip spec."""
    return "RUN " + json.dumps([*_PIP_COMMAND, validate_pip_spec(spec, allow_urls=True)])


@dataclass(frozen=True)
class _Kind:
    label: str  # "apt" or "pip"
    start: str
    end: str
    render: Callable[[str], str]
    parse: Callable[[str], str | None]
    name: Callable[[str], str]


def _parse_apt_line(line: str) -> str | None:
    if not (line.startswith(_APT_PREFIX) and line.endswith(_APT_SUFFIX)):
        return None
    package = line[len(_APT_PREFIX) : len(line) - len(_APT_SUFFIX)]
    return validate_apt_package(package)


def _parse_pip_line(line: str) -> str | None:
    if not line.startswith("RUN ["):
        return None
    try:
        command = json.loads(line[len("RUN ") :])
    except ValueError:
        return None
    if (
        not isinstance(command, list)
        or len(command) != len(_PIP_COMMAND) + 1
        or command[:-1] != _PIP_COMMAND
        or not isinstance(command[-1], str)
    ):
        return None
    # Only the exact JSON this module writes: no escapes or spacing that
    # Docker's JSON reader might take differently from Python's.
    if line != "RUN " + json.dumps(command):
        return None
    return validate_pip_spec(command[-1], allow_urls=True)


_APT = _Kind("apt", APT_START, APT_END, render_apt_line, _parse_apt_line, apt_name)
_PIP = _Kind("pip", PIP_START, PIP_END, render_pip_line, _parse_pip_line, pip_name)
_KINDS = (_APT, _PIP)


@dataclass(frozen=True)
class _Section:
    kind: _Kind
    start: int  # index of the start marker line
    end: int  # index of the end marker line
    packages: tuple[str, ...]


def _split(dockerfile: str) -> list[str]:
    # Docker splits on "\n" and drops a "\r" before it; so do we, and a "\r"
    # stays part of its line so that joining gives back the same bytes.
    return dockerfile.split("\n")


def _content(line: str) -> str:
    return line.removesuffix("\r")


def _is_comment_or_blank(line: str) -> bool:
    # lstrip() also takes a lone "\r"; this runs on every line of a file up to 256 KB
    return line.lstrip()[:1] in ("", "#")


def _escape_char(lines: list[str]) -> str:
    """The line-continuation character: backslash unless an ``escape``
    parser directive at the top of the file says otherwise."""
    for line in lines:
        match = _DIRECTIVE.fullmatch(_content(line))
        if not match:
            break
        if match.group(1).lower() == "escape" and match.group(2):
            return match.group(2)
    return "\\"


def _check_not_continued(lines: list[str], before: int, what: str) -> None:
    """Refuse when the instruction before ``before`` ends in a line
    continuation: Docker would glue the section's first line onto it."""
    escape = _escape_char(lines)
    for index in range(before - 1, -1, -1):
        if _is_comment_or_blank(lines[index]):
            continue
        if _content(lines[index]).rstrip().endswith(escape):
            raise DockerfileError(
                f"line {index + 1} ends with a line continuation ({escape!r}), so Docker "
                f"would join {what} onto it; finish that instruction on its own line"
            )
        return


def _find_markers(lines: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for index, line in enumerate(lines):
        if "ds01 managed" not in line:  # every marker prefix has it; a cheap first test
            continue
        text = _content(line).strip()
        if not text.startswith(_MARKER_PREFIXES):
            continue
        if text not in _MARKERS:
            raise DockerfileError(
                f"line {index + 1} looks like a ds01 marker but is not one of them: "
                f"{text[:80]!r}; restore it as one of {', '.join(repr(m) for m in _MARKERS)}"
            )
        if text in found:
            raise DockerfileError(
                f"the marker {text!r} appears twice (lines {found[text] + 1} and "
                f"{index + 1}); keep one pair of markers per section"
            )
        found[text] = index
    return found


def _hand_edited(kind: _Kind, number: int, line: str, reason: str = "") -> DockerfileError:
    shown = _content(line)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return DockerfileError(
        f"the managed {kind.label} section was edited by hand at line {number}: {shown!r}"
        f"{reason}. Lines between {kind.start!r} and {kind.end!r} are rewritten by the "
        "image-update page: move your own instructions above or below the markers, "
        f"and add {kind.label} packages on the image-update page"
    )


def _read_section(lines: list[str], kind: _Kind, start: int, end: int) -> tuple[str, ...]:
    body = [index for index in range(start + 1, end) if not _is_comment_or_blank(lines[index])]
    check_package_count(len(body), f"lines in the managed {kind.label} section")
    packages: list[str] = []
    seen: dict[str, int] = {}
    for index in body:
        line = lines[index]
        try:
            package = kind.parse(_content(line))
        except PackageError as exc:
            raise _hand_edited(kind, index + 1, line, f" ({exc})") from None
        if package is None:
            raise _hand_edited(kind, index + 1, line)
        name = kind.name(package)
        if name in seen:
            raise DockerfileError(
                f"line {index + 1} installs the {kind.label} package {name!r} again "
                f"(it is already on line {seen[name]}); delete one of the two lines"
            )
        seen[name] = index + 1
        packages.append(package)
    return tuple(packages)


def _sections(dockerfile: str) -> tuple[list[str], dict[str, _Section]]:
    """The file's lines and its managed sections, checked for structure and
    content. A kind without markers is absent from the dict."""
    lines = _split(dockerfile)
    markers = _find_markers(lines)
    bounds: dict[str, tuple[_Kind, int, int]] = {}
    for kind in _KINDS:
        start, end = markers.get(kind.start), markers.get(kind.end)
        if start is None and end is None:
            continue
        if start is None or end is None:
            present, missing = (kind.start, kind.end) if end is None else (kind.end, kind.start)
            number = (start if end is None else end) + 1
            raise DockerfileError(
                f"line {number} has the marker {present!r} but {missing!r} is missing; "
                "put the pair back, or delete both and the section is added again at the end"
            )
        if end < start:
            raise DockerfileError(
                f"the {kind.label} section ends (line {end + 1}) before it starts "
                f"(line {start + 1}); put {kind.start!r} above {kind.end!r}"
            )
        _check_not_continued(lines, start, f"the managed {kind.label} section")
        bounds[kind.label] = (kind, start, end)
    if len(bounds) == 2:
        (_, apt_start, apt_end), (_, pip_start, pip_end) = bounds["apt"], bounds["pip"]
        if apt_start < pip_end and pip_start < apt_end:
            raise DockerfileError(
                f"the managed apt (lines {apt_start + 1}-{apt_end + 1}) and pip "
                f"(lines {pip_start + 1}-{pip_end + 1}) sections overlap; "
                "close one section before opening the other"
            )
    sections = {
        label: _Section(kind, start, end, _read_section(lines, kind, start, end))
        for label, (kind, start, end) in bounds.items()
    }
    return lines, sections


def read_managed(dockerfile: str) -> ManagedPackages:
    """The packages the managed sections install.

    Blank lines and comments inside a section are ignored (and dropped the next
    time the section is written); any other line must be exactly what this
    module writes, so a hand edit is reported instead of silently lost. A
    section without markers counts as empty. https direct references
    (``name @ https://...``) are read back: whether researchers may add them
    is the image-update page's policy, not the file's.
    """
    _, sections = _sections(dockerfile)
    return ManagedPackages(
        apt=sections["apt"].packages if "apt" in sections else (),
        pip=sections["pip"].packages if "pip" in sections else (),
    )


def package_changes(before: ManagedPackages, after: ManagedPackages) -> tuple[list[str], list[str]]:
    """(added, removed) between two readings of the managed sections, for the audit
    trail: pip specs as written, apt packages as ``apt:name``; a changed version is
    one of each."""

    def entries(packages: ManagedPackages) -> list[str]:
        return [*packages.pip, *(f"apt:{a}" for a in packages.apt)]

    old, new = entries(before), entries(after)
    return [e for e in new if e not in old], [e for e in old if e not in new]


def _checked(packages: ManagedPackages) -> ManagedPackages:
    """Validate (again) and normalize every package, refuse duplicates and
    lists too long to build."""
    if not isinstance(packages, ManagedPackages):
        raise TypeError("render_managed takes a ManagedPackages")
    check_package_count(len(packages.apt) + len(packages.pip))
    apt = tuple(validate_apt_package(p) for p in packages.apt)
    pip = tuple(validate_pip_spec(p, allow_urls=True) for p in packages.pip)
    for kind, entries in ((_APT, apt), (_PIP, pip)):
        counts = Counter(kind.name(entry) for entry in entries)
        repeated = sorted(name for name, count in counts.items() if count > 1)
        if repeated:
            raise DockerfileError(
                f"{kind.label} packages listed more than once: {', '.join(repeated)}; "
                "keep one entry per package"
            )
    return ManagedPackages(apt=apt, pip=pip)


def render_managed(dockerfile: str, packages: ManagedPackages) -> str:
    """The Dockerfile with both managed sections written from ``packages``.

    Everything outside the sections is returned byte for byte. A section whose
    markers are missing is appended at the end of the file, after a blank
    line. Refuses (raises) when the current sections were edited by hand, so
    nothing a researcher wrote is dropped, and when a package is invalid.
    """
    packages = _checked(packages)
    lines, sections = _sections(dockerfile)
    wanted = {"apt": packages.apt, "pip": packages.pip}
    # Replace bodies from the bottom up so earlier indices stay valid.
    for section in sorted(sections.values(), key=lambda s: s.start, reverse=True):
        cr = "\r" if lines[section.start].endswith("\r") else ""
        body = [section.kind.render(p) + cr for p in wanted[section.kind.label]]
        lines[section.start + 1 : section.end] = body
    result = "\n".join(lines)

    missing = [kind for kind in _KINDS if kind.label not in sections]
    if not missing:
        return result
    _check_not_continued(lines, len(lines), "the appended managed sections")
    newline = "\r\n" if "\r\n" in dockerfile else "\n"
    blocks = [
        newline.join([kind.start, *map(kind.render, wanted[kind.label]), kind.end]) + newline
        for kind in missing
    ]
    if result and not result.endswith(newline):
        result += newline
    if result and not result.endswith(newline * 2):
        result += newline
    return result + newline.join(blocks)


def _bounded_lists(**lists: Iterable[str]) -> dict[str, list[str]]:
    """The package lists as lists, refused when too long before any entry is read."""
    out: dict[str, list[str]] = {}
    for name, value in lists.items():
        if isinstance(value, str):
            raise TypeError(f"{name}= takes a list of packages, not a single string")
        out[name] = list(value)
    check_package_count(sum(map(len, out.values())), "packages named")
    return out


def add_packages(
    dockerfile: str,
    *,
    pip: Iterable[str] = (),
    apt: Iterable[str] = (),
    allow_urls: bool = False,
) -> str:
    """The Dockerfile with packages added to its managed sections.

    A package already there (pip by canonical name, apt by name without its
    version) is replaced in place, so its position, and the layers before it,
    stay; new packages are appended. If nothing changes, the input comes back
    unchanged. ``allow_urls`` lets pip specs be https direct references.
    """
    named = _bounded_lists(pip=pip, apt=apt)
    new_pip = [validate_pip_spec(spec, allow_urls=allow_urls) for spec in named["pip"]]
    new_apt = [validate_apt_package(package) for package in named["apt"]]
    current = read_managed(dockerfile)
    updated = ManagedPackages(
        apt=_merged(current.apt, new_apt, apt_name),
        pip=_merged(current.pip, new_pip, pip_name),
    )
    if updated == current:
        return dockerfile
    return render_managed(dockerfile, updated)


def _merged(
    current: tuple[str, ...], additions: list[str], name: Callable[[str], str]
) -> tuple[str, ...]:
    """``current`` with each addition replacing the entry of its name in place,
    or appended: one dict keyed by name (dicts keep insertion order)."""
    entries = {name(entry): entry for entry in current}
    for addition in additions:
        entries[name(addition)] = addition
    return tuple(entries.values())


def remove_packages(dockerfile: str, *, pip: Iterable[str] = (), apt: Iterable[str] = ()) -> str:
    """The Dockerfile without the named packages.

    pip packages are matched by canonical name (``Scikit_Learn`` removes
    ``scikit-learn>=1``), apt packages by name (a ``=version`` given is
    ignored). Naming a package the managed sections do not install is an
    error: it may be installed by a line outside the markers, which this
    function does not touch.
    """
    named = _bounded_lists(pip=pip, apt=apt)
    pip_names = {pip_name(spec) for spec in named["pip"]}
    apt_names = {apt_name(package) for package in named["apt"]}
    if not pip_names and not apt_names:
        return dockerfile
    current = read_managed(dockerfile)
    missing = [
        f"pip package {n!r}" for n in sorted(pip_names - {pip_name(s) for s in current.pip})
    ] + [f"apt package {n!r}" for n in sorted(apt_names - {apt_name(p) for p in current.apt})]
    if missing:
        raise DockerfileError(
            f"not in the managed sections, so not removed: {', '.join(missing)}; "
            "a package installed by a line outside the markers has to be removed by "
            "editing the Dockerfile"
        )
    return render_managed(
        dockerfile,
        ManagedPackages(
            apt=tuple(p for p in current.apt if apt_name(p) not in apt_names),
            pip=tuple(s for s in current.pip if pip_name(s) not in pip_names),
        ),
    )

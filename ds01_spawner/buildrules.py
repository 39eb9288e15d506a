"""What a researcher's Dockerfile may do, checked before every build.

A project's Dockerfile is the user's own file, and the build runs on the lab's
engine, so it is hostile input. Three rules keep one user's build from
reaching another's, or the hub's own records:

- ``FROM`` names only the lab's base images or the user's own project images
  (after the build arguments are expanded, as Docker would), or an earlier
  stage; ``COPY --from`` and ``RUN --mount from=`` likewise.
- ``LABEL`` never sets a ``ds01.*`` key: those labels are the engine-side
  record the hub trusts (the GPU ledger above all), and a build's intermediate
  containers carry whatever the Dockerfile labelled.
- ``ENV``/``ARG`` never set ``NVIDIA_VISIBLE_DEVICES``: the spawner alone decides
  which GPUs a container sees, and `render_for_build` hides them from builds.

Pure functions of the text: `check_dockerfile` raises `BuildRuleError` naming
the line and what to do.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

# set right after every FROM of a build: an engine whose default runtime is
# nvidia would otherwise give a base image's `NVIDIA_VISIBLE_DEVICES=all` to RUN
NO_GPU_LINE = "ENV NVIDIA_VISIBLE_DEVICES=void"
_GPU_KEYS = ("NVIDIA_VISIBLE_DEVICES",)
_DIRECTIVE = re.compile(r"#\s*([A-Za-z]+)\s*=\s*(\S+)\s*$")
_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
MAX_INSTRUCTIONS = 2000


class BuildRuleError(ValueError):
    """The Dockerfile breaks a lab rule; the message names the line."""


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line of its first physical line
    end: int  # 1-based line of its last physical line
    keyword: str  # upper case
    rest: str


def instructions(text: str) -> Iterator[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = text.split("\n")
    escape = "\\"
    for raw in lines:  # parser directives: only at the very top
        match = _DIRECTIVE.match(raw.strip())
        if not match:
            break
        if match.group(1).lower() == "escape" and match.group(2) in ("\\", "`"):
            escape = match.group(2)
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not parts and (not stripped or stripped.startswith("#")):
            continue
        if parts and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not parts:
            start = number
        if stripped.endswith(escape):
            parts.append(stripped[: -len(escape)].rstrip())
            continue
        parts.append(stripped)
        joined = " ".join(p for p in parts if p)
        parts = []
        keyword, _, rest = joined.partition(" ")
        yield Instruction(start, number, keyword.upper(), rest.strip())
    if parts:
        joined = " ".join(p for p in parts if p)
        keyword, _, rest = joined.partition(" ")
        yield Instruction(start, len(lines), keyword.upper(), rest.strip())


def expand(word: str, args: dict[str, str]) -> str:
    """`$X`, `${X}`, `${X:-default}`, `${X:+alt}` as Docker expands them in FROM."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(4)
        value = args.get(name, "")
        if m.group(2) == ":-":
            return value or m.group(3)
        if m.group(2) == ":+":
            return m.group(3) if value else ""
        return value

    return _VAR.sub(one, word)


def _words(rest: str, where: Instruction) -> list[str]:
    try:
        return shlex.split(rest, posix=True)
    except ValueError as e:
        raise BuildRuleError(f"line {where.line}: cannot read {where.keyword} ({e})") from None


def _keys(rest: str, where: Instruction) -> list[str]:
    """The keys a LABEL / ENV / ARG sets (`k=v k2=v2`, or the old `k v` form)."""
    words = _words(rest, where)
    if where.keyword == "ARG" or any("=" in w for w in words[:1]):
        return [w.partition("=")[0] for w in words]
    return words[:1]


def repository(ref: str) -> str:
    """`ds01/singleuser:latest` -> `ds01/singleuser`; digests and tags dropped."""
    name = ref.partition("@")[0]
    head, _, tail = name.rpartition("/")
    if ":" in tail:
        tail = tail.partition(":")[0]
    return f"{head}/{tail}" if head else tail


def image_allowed(ref: str, allowed: Iterable[str], own_prefix: str) -> bool:
    repo = repository(ref).lower()
    if own_prefix and repo.startswith(own_prefix):
        return True
    return any(
        fnmatch.fnmatchcase(repo, repository(pattern).lower())
        or fnmatch.fnmatchcase(ref.lower(), pattern.lower())
        for pattern in allowed
    )


def check_dockerfile(
    text: str,
    *,
    buildargs: dict[str, str],
    allowed_images: Iterable[str],
    own_prefix: str,
) -> list[Instruction]:
    """Raise BuildRuleError if the Dockerfile breaks a rule; return its instructions.

    `own_prefix` is the start of the user's own image repositories
    (``ds01-<slug>/``); `allowed_images` the lab's bases (patterns allowed).
    """
    allowed = list(allowed_images)
    found = list(instructions(text))
    if len(found) > MAX_INSTRUCTIONS:
        raise BuildRuleError(f"the Dockerfile has over {MAX_INSTRUCTIONS} instructions")
    args: dict[str, str] = {}  # global ARGs (before the first FROM), as this build sets them
    stages: set[str] = set()  # earlier stages, by name and by index
    for ins in found:
        _check(ins, ins.keyword, ins.rest)
        _check_from_refs(ins, ins.keyword, ins.rest, stages, allowed, own_prefix)
        if ins.keyword == "ONBUILD":  # runs in a later build FROM this image
            inner, _, inner_rest = ins.rest.partition(" ")
            if inner.upper() in ("FROM", "ONBUILD"):
                raise BuildRuleError(f"line {ins.line}: ONBUILD {inner.upper()} is not allowed")
            _check(ins, inner.upper(), inner_rest.strip())
            _check_from_refs(ins, inner.upper(), inner_rest, stages, allowed, own_prefix)
        if ins.keyword == "ARG" and not stages:
            for word in _words(ins.rest, ins):
                key, _, default = word.partition("=")
                args[key] = buildargs.get(key, default)
        if ins.keyword == "FROM":
            words = [w for w in _words(ins.rest, ins) if not w.startswith("--platform")]
            if not words:
                raise BuildRuleError(f"line {ins.line}: FROM names no image")
            image = expand(words[0], args)
            if image.lower() not in stages and not image_allowed(image, allowed, own_prefix):
                raise BuildRuleError(
                    f"line {ins.line}: FROM {image} is not allowed: build FROM the lab's base "
                    f"images ({', '.join(allowed) or 'none'}) or one of your own project "
                    f"images ({own_prefix}...)"
                )
            index = sum(s.isdigit() for s in stages)
            stages.add(str(index))
            if len(words) >= 3 and words[1].upper() == "AS":
                stages.add(words[2].lower())
    return found


def _check(ins: Instruction, keyword: str, rest: str) -> None:
    if keyword == "LABEL":
        for key in _keys(rest, ins):
            if key.lower().startswith("ds01") or "$" in key:
                raise BuildRuleError(
                    f"line {ins.line}: LABEL {key} is not allowed: ds01.* labels are the "
                    "hub's own record of its images and containers; choose another key"
                )
    if keyword in ("ENV", "ARG"):
        for key in _keys(rest, ins):
            if key.upper() in _GPU_KEYS or "$" in key:
                raise BuildRuleError(
                    f"line {ins.line}: {keyword} {key} is not allowed: the hub decides which "
                    "GPUs a container sees"
                )


def _check_from_refs(
    ins: Instruction,
    keyword: str,
    rest: str,
    stages: set[str],
    allowed: list[str],
    own_prefix: str,
) -> None:
    """`COPY --from=X` and `RUN --mount=...,from=X` name a stage or an allowed image."""
    if keyword not in ("COPY", "ADD", "RUN"):
        return
    refs = []
    for word in rest.split():
        if not word.startswith("--"):
            break  # the flags come first; the rest is the command or the paths
        if word.startswith("--from="):
            refs.append(word[len("--from=") :])
        elif word.startswith("--mount="):
            refs += [
                part[len("from=") :]
                for part in word[len("--mount=") :].split(",")
                if part.startswith("from=")
            ]
    for ref in refs:
        ref = ref.strip("'\"")
        if "$" in ref or (
            ref.lower() not in stages and not image_allowed(ref, allowed, own_prefix)
        ):
            raise BuildRuleError(
                f"line {ins.line}: {keyword} from {ref} is not allowed: copy from an "
                "earlier stage, the lab's base images or your own project images"
            )


def render_for_build(text: str, found: list[Instruction]) -> str:
    """The Dockerfile the engine builds: `NO_GPU_LINE` after every FROM."""
    ends = {ins.end for ins in found if ins.keyword == "FROM"}
    lines = text.split("\n")
    out: list[str] = []
    for number, line in enumerate(lines, 1):
        out.append(line)
        if number in ends:
            out.append(NO_GPU_LINE)
    return "\n".join(out)

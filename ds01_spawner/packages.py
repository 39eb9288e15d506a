"""Validators for the packages researchers add to their project image.

Every package name or spec typed on the image-update page passes through one of
these functions before it goes anywhere near a Dockerfile or a shell. They
accept a deliberately small language: what people actually type to install a
package from PyPI or Debian, nothing that pip or apt-get would read as an
option, a path, a URL (unless asked for) or an environment marker. Each check
is an allow-list, so a character nobody thought of is refused, not let
through.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

MAX_PIP_SPEC_LENGTH = 200
MAX_APT_PACKAGE_LENGTH = 100

# What a PyPI requirement needs: names, extras in [], version specifiers
# (== != <= >= < > ~= ===, wildcards, local versions like 2.3.0+cu121).
_PIP_SPEC_CHARS = re.compile(r"[A-Za-z0-9._\-\[\],=<>!~*+]+")
_PIP_SPEC_CHARS_TEXT = "letters, digits and . _ - [ ] , = < > ! ~ * +"
# The name (and extras) in front of a direct reference.
_PIP_NAME_WITH_EXTRAS = re.compile(r"[A-Za-z0-9._\-\[\],]+")
# An https URL without credentials, spaces, quotes or shell metacharacters.
_URL_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#=%+,]+")

# Debian policy: lower case letters, digits, + - . ; at least two characters,
# starting with a letter or digit.
_APT_NAME = re.compile(r"[a-z0-9][a-z0-9+.\-]+")
# Debian policy: [epoch:]upstream_version[-debian_revision], starting with a
# digit. A colon only as the epoch separator, so no "~" can follow one (a
# tilde after ":" or "=" is where shells expand home directories).
_APT_VERSION = re.compile(r"(?:[0-9]+:)?[0-9][A-Za-z0-9.+~\-]*")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class PackageError(ValueError):
    """A package name or spec that cannot go into a project image."""


def _shown(value: str) -> str:
    """The offending input, short enough for an error message and repr'd so
    that newlines and other invisible characters show."""
    if len(value) > 60:
        value = value[:57] + "..."
    return repr(value)


def _refuse(kind: str, value: str, why: str) -> PackageError:
    return PackageError(f"{kind} {_shown(value)} is not allowed: {why}")


def _check_characters(kind: str, raw: str) -> str:
    """Refuse control characters anywhere (even at the ends) and anything not
    ASCII, then strip outer spaces."""
    if _CONTROL.search(raw):
        raise _refuse(kind, raw, "it contains a control character (newline, tab, NUL, ...)")
    if not raw.isascii():
        raise _refuse(
            kind,
            raw,
            "only ASCII characters are allowed (look-alike letters from other "
            "alphabets are not package names)",
        )
    return raw.strip(" ")


def _basic_checks(kind: str, value: object, max_length: int, *, empty: str, options: str) -> str:
    """What every package input must pass first: text, allowed characters, length, no option."""
    if not isinstance(value, str):
        raise PackageError(f"{kind} must be text, not {type(value).__name__}")
    stripped = _check_characters(kind, value)
    if not stripped:
        raise PackageError(f"{kind} is empty: {empty}")
    if len(stripped) > max_length:
        raise _refuse(kind, stripped, f"it is longer than {max_length} characters")
    if stripped.startswith("-"):
        raise _refuse(kind, stripped, options)
    return stripped


def validate_pip_spec(spec: str, *, allow_urls: bool = False) -> str:
    """A pip requirement as researchers type it, normalized.

    Accepts ``name``, ``name[extra,...]`` and version specifiers
    (``numpy>=1.24,<2``, ``transformers==4.*``, ``torch~=2.3``). With
    ``allow_urls`` it also accepts a PEP 508 direct reference to an https URL
    (``name @ https://...``). Environment markers are refused: they are rarely
    needed in a project image and ``;`` is where injections start.

    The result is ``str(Requirement(spec))``: the name as typed, extras and
    specifiers in packaging's canonical order.
    """
    kind = "pip package"
    stripped = _basic_checks(
        kind,
        spec,
        MAX_PIP_SPEC_LENGTH,
        empty="give a name like 'numpy' or 'numpy>=1.24'",
        options="pip options (-e, -r, --index-url, ...) cannot be given here",
    )
    lowered = stripped.lower()
    looks_like_url = "://" in stripped or "@" in stripped
    if looks_like_url and allow_urls:
        return _validate_direct_reference(stripped)
    if looks_like_url:
        raise _refuse(kind, stripped, "URLs and direct references (name @ url) are not allowed")
    if (
        "/" in stripped
        or stripped.startswith((".", "~"))
        or ".." in stripped
        or lowered.startswith("file:")
    ):
        raise _refuse(kind, stripped, "paths are not allowed; give a package name from PyPI")
    if ";" in stripped:
        raise _refuse(
            kind, stripped, "environment markers (after ';') are not allowed in a project image"
        )
    if any(c.isspace() for c in stripped):
        raise _refuse(kind, stripped, "write it without spaces, like 'numpy>=1.24,<2'")
    if not _PIP_SPEC_CHARS.fullmatch(stripped):
        raise _refuse(kind, stripped, f"only {_PIP_SPEC_CHARS_TEXT} may be used")
    return _parse(kind, stripped)


def _validate_direct_reference(spec: str) -> str:
    kind = "pip package"
    name_part, at, url = spec.partition("@")
    name_part, url = name_part.strip(" "), url.strip(" ")
    if not at or not name_part:
        raise _refuse(kind, spec, "a URL must be written as 'name @ https://...'")
    if not _PIP_NAME_WITH_EXTRAS.fullmatch(name_part):
        raise _refuse(
            kind, spec, "before '@' give only the package name (and [extras]), no version"
        )
    if not _URL_CHARS.fullmatch(url):
        raise _refuse(
            kind,
            spec,
            "the URL may only contain letters, digits and - . _ ~ : / ? # = % + , "
            "(no spaces, quotes, credentials or shell characters)",
        )
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise _refuse(kind, spec, "only https:// URLs with a host name are allowed")
    return _parse(kind, f"{name_part} @ {url}")


def _parse(kind: str, spec: str) -> str:
    try:
        requirement = Requirement(spec)
    except InvalidRequirement as exc:
        reason = str(exc).splitlines()[0]
        raise _refuse(kind, spec, f"it is not a valid requirement ({reason})") from None
    if requirement.marker is not None:  # already refused above; kept as a backstop
        raise _refuse(kind, spec, "environment markers are not allowed")
    return str(requirement)


def pip_name(spec: str) -> str:
    """The canonical project name of a spec (``Scikit_Learn>=1`` -> ``scikit-learn``),
    which is what pip itself matches on: add and remove go by this name."""
    return canonicalize_name(Requirement(validate_pip_spec(spec, allow_urls=True)).name)


def validate_apt_package(name: str) -> str:
    """A Debian package name, optionally pinned as ``name=version``.

    Names follow Debian policy exactly (lower case, digits, ``+ - .``), so
    they are safe to put unquoted in a shell command; no flag, path, space or
    shell character gets through.
    """
    kind = "apt package"
    stripped = _basic_checks(
        kind,
        name,
        MAX_APT_PACKAGE_LENGTH,
        empty="give a Debian package name like 'ffmpeg'",
        options="apt-get options cannot be given here",
    )
    package, eq, version = stripped.partition("=")
    if not _APT_NAME.fullmatch(package):
        raise _refuse(
            kind,
            stripped,
            "a Debian package name has at least two characters, starts with a letter or "
            "digit, and uses only lower-case letters, digits and + - .",
        )
    if eq and not _APT_VERSION.fullmatch(version):
        raise _refuse(
            kind,
            stripped,
            "a version (after '=') starts with a digit and uses only letters, digits "
            "and . + ~ - (with an optional 'epoch:' in front)",
        )
    return stripped


def apt_name(package: str) -> str:
    """The package name without its ``=version`` pin: what add and remove match on."""
    return validate_apt_package(package).partition("=")[0]


# A pasted requirements.txt: what one paste may hold, checked before any line
# is looked at so that no paste costs the service more than a few milliseconds.
MAX_REQUIREMENTS_LENGTH = 256 * 1024
MAX_REQUIREMENTS_LINE_LENGTH = 4096


def _strip_comment(line: str) -> str:
    """``line`` without its trailing comment: from a ``#`` at the start or after
    whitespace (pip's rule), with the whitespace before it.

    By hand rather than pip's ``(^|\\s+)#.*$``, which backtracks quadratically
    on a long run of spaces without a ``#`` (a 40 KB line took 14 s).
    """
    start = 0
    while (index := line.find("#", start)) != -1:
        if index == 0 or line[index - 1].isspace():
            return line[:index].rstrip()
        start = index + 1
    return line


def parse_requirements_text(
    text: str, *, allow_urls: bool = False, max_lines: int = 200
) -> list[str]:
    """The packages in a pasted requirements.txt, validated and normalized.

    Blank lines and comments are skipped. Option lines (``-r``, ``-e``,
    ``--index-url``, anything starting with ``-``) are refused rather than
    skipped, so nobody believes an index or constraint was applied when it was
    not. ``max_lines`` counts package lines. When a package appears twice
    (by its canonical name) the first line wins and later ones are dropped,
    which is what a reader scanning the list from the top expects.
    """
    if not isinstance(text, str):
        raise PackageError(f"requirements must be text, not {type(text).__name__}")
    if len(text) > MAX_REQUIREMENTS_LENGTH:
        raise PackageError(
            f"the requirements are {len(text)} characters, more than the "
            f"{MAX_REQUIREMENTS_LENGTH} one paste may hold; trim them to what the project needs"
        )
    specs: dict[str, str] = {}
    count = 0
    # Split on "\n" only (a CR before it is a Windows line end): other line
    # separators that str.splitlines() knows are refused as control characters.
    for number, raw_line in enumerate(text.split("\n"), start=1):
        if len(raw_line) > MAX_REQUIREMENTS_LINE_LENGTH:
            raise PackageError(
                f"line {number} is {len(raw_line)} characters long, more than "
                f"{MAX_REQUIREMENTS_LINE_LENGTH}; no requirement (or comment) needs that much"
            )
        line = _strip_comment(raw_line.removesuffix("\r")).strip(" \t")
        if not line:
            continue
        if line.startswith("-"):
            raise PackageError(
                f"line {number}: {_shown(line)} is a pip option; options (-r, -e, -c, "
                "--index-url, ...) are not allowed, list one package per line"
            )
        count += 1
        if count > max_lines:
            raise PackageError(
                f"line {number}: more than {max_lines} packages; split the list or "
                "trim it to what the project needs"
            )
        try:
            spec = validate_pip_spec(line, allow_urls=allow_urls)
        except PackageError as exc:
            raise PackageError(f"line {number}: {exc}") from None
        specs.setdefault(pip_name(spec), spec)
    return list(specs.values())

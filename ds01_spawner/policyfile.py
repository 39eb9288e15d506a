"""Reading a policy file safely: YAML in, plain values out, errors that say where.

PyYAML's SafeLoader, narrowed to what a policy needs (no tags, anchors or
aliases, bounded size and depth), with the line of every key kept so that a
`PolicyError` names the file, the line and the key. What the values mean is
`limits`.
"""

from __future__ import annotations

from typing import Any

import yaml


class PolicyError(ValueError):
    """A policy that cannot be used; the message names where (file, line, key) and why."""

    def __init__(self, message: str, *, source: str = "", line: int | None = None, key: str = ""):
        self.source, self.line, self.key, self.reason = source, line, key, message
        where = ", ".join(
            part
            for part in (source, f"line {line}" if line else "", f"key {key}" if key else "")
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


# PyYAML reads about 140 KB a second here, and the hub reads the policy on its
# event loop after each edit; 256 KB is a lab of several thousand users.
MAX_POLICY_BYTES = 256 * 1024
MAX_POLICY_DEPTH = 16  # users -> name -> limit -> list is four


class _NotAllowed(yaml.composer.ComposerError):
    """YAML that parses, but that a policy may not use."""


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader's composer, refusing what a policy never needs: explicit tags
    (``!!python/object``, ``!custom``), which no constructor here should meet,
    and anchors and aliases, which expand exponentially once the tree is walked
    (an alias bomb of nine levels is a billion values). Nesting is bounded too,
    so that composing never recurses deeper than a policy needs."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _NotAllowed(
                None,
                None,
                "anchors and aliases (&name, *name) are not allowed in the policy; "
                "write each value out",
                event.start_mark,
            )
        tag = getattr(event, "tag", None)
        if tag not in (None, "!"):
            raise _NotAllowed(
                None,
                None,
                f"the tag {tag!r} is not allowed in the policy; write plain values",
                event.start_mark,
            )
        if self._depth >= MAX_POLICY_DEPTH:
            raise _NotAllowed(
                None, None, f"nested more than {MAX_POLICY_DEPTH} levels deep", event.start_mark
            )
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class Located:
    """Values from YAML with the line of each key, to point errors at the file."""

    def __init__(self, source: str, loader: yaml.SafeLoader | None = None) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        self.loader = loader or _PolicyLoader("")

    def error(self, key: str, message: str) -> PolicyError:
        return PolicyError(message, source=self.source, line=self.lines.get(key), key=key)

    def convert(self, node: yaml.Node, path: str) -> Any:
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self.convert(key_node, path)
                if not isinstance(key, str):
                    raise PolicyError(
                        f"{key!r} is not a name", source=self.source, line=_line(key_node), key=path
                    )
                where = f"{path}.{key}" if path else key
                if key in out:
                    raise PolicyError(
                        f"given twice (first on line {self.lines[where]})",
                        source=self.source,
                        line=_line(key_node),
                        key=where,
                    )
                self.lines[where] = _line(key_node)
                out[key] = self.convert(value_node, where)
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, value_node in enumerate(node.value):  # `exemptions[0].until`: each its line
                where = f"{path}[{i}]"
                self.lines[where] = _line(value_node)
                items.append(self.convert(value_node, where))
            return items
        try:
            return self.loader.construct_object(node, deep=True)  # a scalar, as YAML types it
        except (yaml.YAMLError, ValueError) as e:  # "2024-13-01" is a timestamp to YAML
            shown = node.value if len(node.value) <= 40 else node.value[:40] + "..."
            reason = getattr(e, "problem", None) or str(e)
            raise PolicyError(
                f"{shown!r} is not a value YAML can read: {reason}",
                source=self.source,
                line=_line(node),
                key=path,
            ) from None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def check_size(size: int, source: str) -> None:
    """Refuse a policy too large to parse quickly (see MAX_POLICY_BYTES)."""
    if size > MAX_POLICY_BYTES:
        raise PolicyError(
            f"the policy is larger than {MAX_POLICY_BYTES // 1024} KB; is this the right file?",
            source=source,
        )


def load_policy_text(text: str, source: str) -> tuple[dict[str, Any], Located]:
    check_size(len(text), source)
    loader = _PolicyLoader(text)
    located = Located(source, loader)
    try:
        node = loader.get_single_node()
        raw = {} if node is None else located.convert(node, "")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        if not isinstance(e, _NotAllowed):
            problem = f"not valid YAML: {problem}"
        raise PolicyError(problem, source=source, line=mark.line + 1 if mark else None) from None
    finally:
        loader.dispose()
    if not isinstance(raw, dict):
        raise PolicyError("the policy must be a mapping of sections", source=source, line=1)
    return raw, located

"""YAML that reads every scalar exactly as the user wrote it.

PyYAML's default (YAML 1.1) resolver turns ``port: 2222:22`` into the base-60 integer 133342, and
``country: NO`` into ``False``. We compose the node graph and keep every scalar as its source text;
the schema decides what each field means. Only an explicit null (``~``, ``null`` or nothing) becomes
``None``. The loader also records where each value sits so errors can name the line and column,
rejects duplicate keys (PyYAML keeps the last one silently), and shares aliased nodes instead of
copying them so a "billion laughs" document costs memory proportional to its size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from portway.errors import ConfigError

Path = tuple[str | int, ...]

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"


@dataclass(frozen=True, slots=True)
class Mark:
    """A 1-based position in a source file."""

    line: int
    column: int


@dataclass(slots=True)
class Document:
    """A parsed YAML document: plain data plus where each value was written."""

    data: Any
    marks: dict[Path, Mark]
    source: str

    def mark_of(self, path: Path) -> Mark | None:
        """Return the position of `path`, or of its nearest ancestor that has one."""
        while True:
            mark = self.marks.get(path)
            if mark is not None or not path:
                return mark
            path = path[:-1]


def load_yaml(text: str, source: str) -> Document:
    """Parse one YAML document from `text`; `source` names it in errors (a file path or label)."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{exc.context}: {problem}"
        raise ConfigError(
            f"not valid YAML: {problem}",
            file=source,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", file=source) from None
    marks: dict[Path, Mark] = {}
    if node is None:
        return Document(None, marks, source)
    data = _Builder(source, marks).build(node, ())
    return Document(data, marks, source)


class _Builder:
    def __init__(self, source: str, marks: dict[Path, Mark]) -> None:
        self.source = source
        self.marks = marks
        self.done: dict[int, Any] = {}

    def _error(self, message: str, node: yaml.Node) -> ConfigError:
        m = node.start_mark
        return ConfigError(message, file=self.source, line=m.line + 1, column=m.column + 1)

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.marks.setdefault(path, Mark(node.start_mark.line + 1, node.start_mark.column + 1))
        cached = self.done.get(id(node))
        if cached is not None:
            return cached
        if isinstance(node, yaml.ScalarNode):
            if node.tag == _NULL_TAG and node.style is None:
                return None
            return str(node.value)
        if isinstance(node, yaml.SequenceNode):
            seq: list[Any] = []
            self.done[id(node)] = seq
            for i, item in enumerate(node.value):
                seq.append(self.build(item, (*path, i)))
            return seq
        if isinstance(node, yaml.MappingNode):
            mapping: dict[str, Any] = {}
            self.done[id(node)] = mapping
            merged: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    for src in self._merge_sources(value_node):
                        for k, v in src.items():
                            merged.setdefault(k, v)
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self._error("mapping keys must be plain scalars", key_node)
                key = str(key_node.value)
                if key in mapping:
                    raise self._error(f"duplicate key {key!r}", key_node)
                mapping[key] = self.build(value_node, (*path, key))
            for k, v in merged.items():
                mapping.setdefault(k, v)
            return mapping
        raise self._error("unsupported YAML node", node)  # pragma: no cover

    def _merge_sources(self, node: yaml.Node) -> list[dict[str, Any]]:
        nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
        out: list[dict[str, Any]] = []
        for n in nodes:
            if not isinstance(n, yaml.MappingNode):
                raise self._error("'<<' merges only mappings", n)
            value = self.build(n, ())
            out.append(value)
        return out

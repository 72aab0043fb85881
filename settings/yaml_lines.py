"""YAML loading that remembers which line every key came from.

``yaml.safe_load`` throws positions away, yet the one thing an operator needs
from a config error is the line to fix.  So documents are composed into nodes
(which carry marks) with PyYAML's safe loader and turned into plain Python data
here, recording along the way the line of each mapping key and list item, and
which string scalars were written quoted (substitution uses that to decide
whether ``${PORT}`` may become an int).  JSON files go through the same code,
JSON being (almost) YAML; the differences are patched in :class:`JsonLineLoader`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from settings.paths import KeyPath

__all__ = [
    "JsonLineLoader",
    "LineLoader",
    "YamlDocument",
    "YamlLoadError",
    "load_document",
    "parse_flow_value",
    "resolve_plain_scalar",
]

_STR_TAG = "tag:yaml.org,2002:str"


class LineLoader(yaml.SafeLoader):
    """The safe loader, subclassed so local tweaks never leak into ``yaml.SafeLoader``."""


class JsonLineLoader(LineLoader):
    """Reads JSON with YAML machinery.

    YAML 1.1 (PyYAML) reads ``1e5`` as a string because its floats need a dot;
    JSON means a number, so exponent forms get their own float resolver here.
    """


JsonLineLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?[eE][-+]?[0-9]+$"),
    list("-0123456789"),
)


class YamlLoadError(Exception):
    """The text is not well-formed YAML/JSON (or uses a construct we refuse)."""

    def __init__(self, problem: str, line: int | None = None) -> None:
        self.problem = problem
        #: 1-based line of the problem, when the parser knows it.
        self.line = line
        super().__init__(problem if line is None else f"line {line}: {problem}")


@dataclass
class YamlDocument:
    """A loaded document plus what the loader remembered about it."""

    data: Any
    #: 1-based line of every mapping key and list item, by key path.
    lines: dict[KeyPath, int] = field(default_factory=dict)
    #: Paths of string values written quoted, block-style or with an explicit tag:
    #: the author asked for a string, so substitution must not re-type them.
    quoted: set[KeyPath] = field(default_factory=set)
    #: Suspicious-but-parseable things, as (path, message); currently duplicate keys.
    problems: list[tuple[KeyPath, str]] = field(default_factory=list)


def load_document(text: str, *, json: bool = False) -> YamlDocument:
    """Parse one YAML (or, with ``json=True``, JSON) document.

    Raises:
        YamlLoadError: for syntax errors, several documents in one stream, unsafe
            tags, unhashable keys or recursive aliases.
    """
    if json:
        # Tabs are legal JSON whitespace but PyYAML refuses them between tokens.
        # Valid JSON cannot contain a raw tab inside a string, so this is lossless.
        text = text.replace("\t", " ")
    loader_cls = JsonLineLoader if json else LineLoader
    loader = loader_cls(text)
    try:
        root = loader.get_single_node()
        doc = YamlDocument(data=None)
        if root is not None:
            doc.data = _Builder(loader, doc).build(root, ())
        return doc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid syntax"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        raise YamlLoadError(problem, mark.line + 1 if mark else None) from exc
    except yaml.YAMLError as exc:
        raise YamlLoadError(str(exc)) from exc
    finally:
        loader.dispose()


class _Builder:
    """Turns a composed node tree into Python data while filling a YamlDocument."""

    def __init__(self, loader: LineLoader, doc: YamlDocument) -> None:
        self.loader = loader
        self.doc = doc
        self._stack: set[int] = set()  # ids of nodes being built, to catch alias cycles

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        if id(node) in self._stack:
            raise YamlLoadError("recursive alias", node.start_mark.line + 1)
        self._stack.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path)
            return self._scalar(node, path)
        finally:
            self._stack.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[Any, Any]:
        self._check_duplicates(node, path)
        self.loader.flatten_mapping(node)  # applies ``<<`` merge keys in place
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node)
            child = (*path, key)
            self.doc.lines[child] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, child)
        return result

    def _sequence(self, node: yaml.SequenceNode, path: KeyPath) -> list[Any]:
        items: list[Any] = []
        for index, item in enumerate(node.value):
            child = (*path, index)
            self.doc.lines[child] = item.start_mark.line + 1
            items.append(self.build(item, child))
        return items

    def _scalar(self, node: yaml.Node, path: KeyPath) -> Any:
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, str) and (
            node.style is not None
            or self.loader.resolve(yaml.ScalarNode, node.value, (True, False)) != _STR_TAG
        ):
            self.doc.quoted.add(path)
        return value

    def _key(self, key_node: yaml.Node) -> Any:
        key = self.loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise YamlLoadError(
                "mapping keys must be scalars", key_node.start_mark.line + 1
            ) from None
        return key

    def _check_duplicates(self, node: yaml.MappingNode, path: KeyPath) -> None:
        """Report keys written twice in one mapping (PyYAML silently keeps the last).

        Merge (``<<``) entries are skipped: overriding a merged key is their point.
        """
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self._key(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                self.doc.problems.append(
                    ((*path, key), f"duplicate key (first written on line {seen[key]})")
                )
            else:
                seen[key] = line


def resolve_plain_scalar(text: str) -> Any:
    """Type ``text`` exactly as YAML types an unquoted scalar.

    ``"8080"`` becomes 8080, ``"true"`` True, ``""`` None, ``"a b"`` stays a string.
    Only scalar resolution happens: no flow syntax, no comments, so a value with
    ``: `` or `` #`` in it is never mangled.
    """
    loader = LineLoader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        return loader.construct_object(yaml.ScalarNode(tag, text), deep=True)
    except yaml.YAMLError:
        return text
    finally:
        loader.dispose()


def parse_flow_value(text: str) -> Any:
    """Parse a one-line YAML value such as ``[a, b]``, ``{k: v}`` or ``"quoted"``.

    Plain values go through :func:`resolve_plain_scalar` instead; this is for
    values that start with a bracket or quote and so clearly mean YAML syntax.

    Raises:
        YamlLoadError: when the text is not valid YAML.
    """
    doc = load_document(text)
    return doc.data

"""YAML as params files need it: ``yaml.safe_load`` plus the checks that turn silent surprises into errors.

Plain YAML keeps only the last of two equal keys in a mapping, so a second ``train:`` section replaces the
first whole and its unmentioned keys fall back to code defaults. And a few lines of nested aliases (an
"alias bomb") expand to billions of values once anything walks the result (validation, a config dump):
minutes of CPU, then a MemoryError. Both are refused here, with the line they are at.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

MAX_VALUES = 100_000  # values a document may hold with its aliases expanded; params files hold a few hundred
MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlProblem(yaml.YAMLError):
    """Well-formed YAML this project refuses; the message names the line."""


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects duplicate keys and alias expansion beyond ``MAX_VALUES`` values."""

    def compose_document(self) -> Node:
        node = super().compose_document()
        if node is not None and expanded_size(node, MAX_VALUES) > MAX_VALUES:
            raise YamlProblem(f"its aliases expand to more than {MAX_VALUES} values (an alias bomb, or an alias "
                              "that contains itself); write the values out instead")
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:  # `<<: *defaults` then overriding a key is what merges are for
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, Hashable) and key in first_line:
                raise YamlProblem(f"key {key!r} appears twice in one mapping, at lines {first_line[key]} and "
                                  f"{line}; YAML would keep only the second, so merge them into one")
            if isinstance(key, Hashable):
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: Node, cap: int) -> int:
    """How many values ``root`` holds with every alias expanded, counted up to ``cap + 1``.

    An alias is the anchored node itself in the composed graph, so sizes are memoised per node: linear in the
    file however large the expansion. A node that contains itself expands without end.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            return cap + 1
        open_nodes.add(key)
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        total = 1
        for child in children:
            total = min(cap + 1, total + size(child))
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(root)


def load(text: str) -> Any:
    """Parse one YAML document with ``StrictLoader``."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)

"""YAML for recipes: the safe loader, made strict and bounded.

PyYAML's safe loader executes nothing, but it still accepts input a recipe should refuse:
- duplicate keys (a second `train:` silently replaced the first),
- YAML 1.1 coercions (`1:30` → 90, `yes`/`on` → true),
- integers past Python's digit limit (a ValueError traceback from deep inside PyYAML),
- nesting deep enough to overflow the recursive composer (RecursionError),
- aliases that expand exponentially ("billion laughs") or refer to themselves.
`load_yaml` refuses each with a `yaml.MarkedYAMLError` that names the line, so callers report it like a
syntax error.
"""

from __future__ import annotations

import re

import yaml

MAX_DEPTH = 64  # recipes nest 3–4 levels; raw DeepSpeed configs a few more
MAX_NODES = 100_000  # after expanding aliases; a recipe has a few hundred, a large sweep a few thousand
MAX_INT_DIGITS = 64


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's surprising scalars, duplicate keys or unbounded nesting."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    if key_node.value in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value!r} (first at line {seen[key_node.value]});"
                            " each key may appear once", key_node.start_mark)
                    seen[key_node.value] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        digits = sum(ch.isdigit() for ch in node.value)
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits is too large", node.start_mark)
        return super().construct_yaml_int(node)


StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)

# YAML 1.2's core schema instead of 1.1's: booleans are only true/false, no base-60 numbers, and
# 1e-4 is a float (1.1 needs a dot). Resolvers are per-class, so SafeLoader itself is untouched.
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes in the tree once every alias is expanded (memoised per node, so it costs the graph's size)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.composer.ComposerError(None, None, "an alias refers to the node that contains it",
                                          node.start_mark)
    open_.add(key)
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes, open_) for item in node.value)
    open_.discard(key)
    sizes[key] = size
    if size > MAX_NODES:
        raise yaml.composer.ComposerError(
            None, None, f"expands to more than {MAX_NODES:,} values (aliases repeated inside aliases?)",
            node.start_mark)
    return size


def load_yaml(text: str) -> tuple[object, yaml.Node | None]:
    """(data, composed node) for one YAML document. Raises yaml.YAMLError (marked where possible)."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _expanded_size(node, {}, set())
        return loader.construct_document(node), node
    except RecursionError:  # the composer's other recursive paths; MAX_DEPTH normally stops it first
        raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()

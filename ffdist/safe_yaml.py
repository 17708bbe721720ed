"""YAML that a stranger may have written: bounded, strict, data only.

`yaml.safe_load` already refuses tags that construct Python objects, but it accepts what
hurts a shared login node or silently changes a recipe:
- **aliases that expand exponentially** ("billion laughs"): PyYAML shares the aliased
  objects, so loading is quick, but OmegaConf copies them into a tree: a 300-byte file
  became minutes and gigabytes. Here the expanded size and depth of the composed node
  graph are counted (each shared node once, with memoization) before anything is built;
- **deep nesting** (`[[[[...]]]]`) that ends in a RecursionError inside the composer;
- **recursive aliases** (`&a [*a]`), which OmegaConf would follow forever;
- **duplicate keys**, of which the last silently wins;
- **implicit dates** (`name: 2024-01-01` becomes a datetime) and the `!!binary`, `!!set`,
  `!!omap`, `!!pairs`, `!!timestamp` tags: a recipe holds strings, numbers, booleans,
  null, lists and mappings only.

Every refusal is a `YamlRefused` with the line number; ffdist.recipe turns it into one
sentence naming the file (or the command-line override).
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 512 << 10
"""A recipe file's size limit (512 KiB): the largest real one, a filelist recipe naming
21,841 ImageNet-21k classes, is about 300 KB (and takes OmegaConf ~7 s to take in: ~0.3 ms
per value, here)."""
MAX_ALIAS_NODES = 10_000
"""Values that aliases may ADD by expansion (OmegaConf's own loader stops at 10,000 in
all); a plain list of any length is bounded by MAX_BYTES instead."""
MAX_DEPTH = 32
"""Nesting depth after alias expansion: a recipe needs 4 (root, section, list, item)."""
MAX_ALIASES = 1_000
"""Alias uses (`*name`) in one document."""

ALLOWED_TAGS = {f"tag:yaml.org,2002:{t}" for t in
                ("null", "bool", "int", "float", "str", "seq", "map", "merge")}


class YamlRefused(ValueError):
    """The text is YAML, but not one ffdist accepts; `line` is 1-based (0: unknown)."""

    def __init__(self, message: str, line: int = 0):
        super().__init__(message)
        self.line = line


# YAML 1.1 reads 1e-3 as a string; OmegaConf's own loader (and so every Hydra user) reads it
# as a float: the same regular expression, so that file and command line agree with it.
_FLOAT = re.compile(r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


def _line(node_or_mark: Any) -> int:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return mark.line + 1 if mark is not None and hasattr(mark, "line") else 0


class LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with the limits above; use through `load`."""

    # A copy of SafeLoader's implicit resolvers without the timestamp one (dates stay str).
    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    # Only plain data: any other tag reaches construct_undefined (a ConstructorError).
    yaml_constructors = {tag: fn for tag, fn in yaml.SafeLoader.yaml_constructors.items()
                         if tag is None or tag in ALLOWED_TAGS}

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise YamlRefused(f"more than {MAX_ALIASES} alias uses (*name)",
                                  _line(self.peek_event()))
            return super().compose_node(parent, index)
        self._depth += 1  # the composer recurses once per level: stop before Python does
        try:
            if self._depth > MAX_DEPTH:
                raise YamlRefused(f"nested deeper than {MAX_DEPTH} levels", _line(self.peek_event()))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, ScalarNode):
                continue
            key = key_node.value
            if key in seen:
                shown = key if key.isprintable() else repr(key)[1:-1]
                raise YamlRefused(f"duplicate key '{shown}' at lines {seen[key]} and "
                                  f"{_line(key_node)} (the second would silently replace the "
                                  "first); keep one", _line(key_node))
            seen[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)


LimitedLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _check_expansion(root: Node) -> None:
    """Count nodes and depth as OmegaConf would see them (aliases expanded), visiting each
    shared node once: linear in the text, however large the expansion."""
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded size, height)
    active: set[int] = set()

    def walk(node: Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in memo:
            size, height = memo[key]
        elif key in active:
            raise YamlRefused("an alias refers to the mapping or list that contains it "
                              "(a recursive structure)", _line(node))
        else:
            active.add(key)
            size, height = 1, 1
            if isinstance(node, SequenceNode):
                children = node.value
            elif isinstance(node, MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            for child in children:
                s, h = walk(child, depth + 1)
                size, height = size + s, max(height, h + 1)
                if size - len(memo) > MAX_ALIAS_NODES:  # expanded minus distinct nodes
                    raise YamlRefused(f"aliases expand it by more than {MAX_ALIAS_NODES:,} "
                                      "values", _line(node))
            active.discard(key)
            memo[key] = size, height
        if depth + height - 1 > MAX_DEPTH:
            raise YamlRefused(f"aliases nest it deeper than {MAX_DEPTH} levels", _line(node))
        return size, height

    walk(root, 1)


def load(text: str) -> Any:
    """Parse one YAML document with the limits above. Raises YamlRefused (limits, duplicate
    keys, tags) or yaml.YAMLError (syntax)."""
    loader = LimitedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.constructor.ConstructorError as e:
        if "could not determine a constructor for the tag" not in str(e.problem):
            raise
        tag = str(e.problem).split("tag", 1)[1].strip(" '")
        tag = tag.replace("tag:yaml.org,2002:", "!!")
        raise YamlRefused(f"the tag {tag} is not allowed: a recipe holds plain values only "
                          "(strings, numbers, true/false, null, lists, mappings); remove the "
                          "tag", _line(e.problem_mark)) from None
    finally:
        loader.dispose()

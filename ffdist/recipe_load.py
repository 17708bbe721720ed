"""Reading a recipe: a YAML file (or the defaults) merged onto the schema of ffdist.recipe,
then `key=value` overrides from the command line; typed, validated, frozen.

OmegaConf does parsing and type coercion (structured configs, as Hydra/torchtune users
know them); this module turns its exceptions into one `RecipeError` sentence that names
the file, the dotted key, the value and the fix, with a did-you-mean for unknown keys.

A recipe may come from a stranger (a shared login node, a copied config): it is read with
bounded size, alias expansion and nesting, duplicate keys refused (ffdist.safe_yaml), and
no value may call an OmegaConf resolver (`${oc.env:...}` would copy the environment into
the saved recipe.yaml): the shell expands `$VAR` on the command line instead, visibly.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from pathlib import Path
from typing import Any

import yaml

from ffdist import safe_yaml
from ffdist.errors import RecipeError, printable
from ffdist.recipe import SECTIONS, Invalid, Recipe, flatten


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (or the defaults when path is None) and apply `key=value`s."""
    source = str(path) if path is not None else "<defaults>"
    raw = _read_yaml(Path(path)) if path is not None else {}
    return from_dict(raw, overrides, source=source)


def from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (),
              source: str = "<recipe>") -> Recipe:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = _normalize(raw, source)
    cli = parse_overrides(overrides)
    cli_keys = [k for k, _ in cli]
    origin = source
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Recipe), OmegaConf.create(raw))
        origin = "the command line"
        cfg = OmegaConf.merge(cfg, OmegaConf.create(_normalize(_nest(cli), "command line")))
        _refuse_resolvers(OmegaConf.to_container(cfg, resolve=False), source, cli_keys)
        rcp = OmegaConf.to_object(cfg)
    except Invalid as e:
        where = "command line" if _from_cli(e.key, cli_keys) else source
        verdict = "is out of range" if isinstance(e.value, (int, float)) else "is not valid"
        raise RecipeError(f"{where}: {e.key}={e.value!r} {verdict}: {e.fix}.") from None
    except OmegaConfBaseException as e:
        raise RecipeError(_explain(e, source, origin)) from None
    _check_values(rcp, source, cli_keys)
    _expand_home(rcp, source, cli_keys)
    return rcp


PATH_KEYS = ("output_dir", "data.root", "data.train_list", "data.val_list", "model.pretrained",
             "strategy.deepspeed_config", "checkpoint.resume", "data.train_shards",
             "data.val_shards", "data.shard_index")
"""Recipe keys that name a file or folder. A leading `~` is expanded here, the one place,
whether the value came from YAML (where no shell expands it) or the command line (where a
quoted one is not): otherwise `output_dir: ~/runs/x` would create a folder named `~` in the
working directory. The run's recipe.yaml records the expanded path. (A shard location that
is a URL or a `pipe:` command does not start with `~` and is left as it is.)"""


def _expand_home(rcp: Recipe, source: str, cli_keys: list[str]) -> None:
    for key in PATH_KEYS:
        *sections, last = key.split(".")
        owner = functools.reduce(getattr, sections, rcp)
        value = getattr(owner, last)
        if not (isinstance(value, str) and value.startswith("~")):
            continue
        expanded = os.path.expanduser(value)
        if expanded.startswith("~"):
            where = "command line" if _from_cli(key, cli_keys) else source
            user = value.split("/", 1)[0]
            raise RecipeError(f"{where}: {key}={printable(value)}: {printable(user)} is not a "
                              "user's home folder here; write the whole path.")
        setattr(owner, last, expanded)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise RecipeError(f"{path}: no such recipe file; give the path of a YAML recipe, "
                          "e.g. recipes/digits.yaml.")
    if not path.is_file():
        raise RecipeError(f"{path}: not a regular file; give the path of a YAML recipe, "
                          "e.g. recipes/digits.yaml.")
    try:
        with open(path, "rb") as f:
            data = f.read(safe_yaml.MAX_BYTES + 1)  # not st_size: it may grow, or lie (/proc)
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror}).") from None
    if len(data) > safe_yaml.MAX_BYTES:
        raise RecipeError(f"{path}: larger than {safe_yaml.MAX_BYTES >> 10} KiB, which no "
                          "recipe needs; give the path of a YAML recipe, e.g. "
                          "recipes/digits.yaml.")
    try:
        raw = safe_yaml.load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (not UTF-8); a recipe is a YAML "
                          "mapping.") from None
    except safe_yaml.YamlRefused as e:
        where = f" line {e.line}" if e.line else ""
        raise RecipeError(f"{path}{where}: {e}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise RecipeError(f"{path}: not valid YAML{where}{problem}; fix the syntax "
                          "there.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: the recipe must be a YAML mapping of sections "
                          f"(name, model, data, ...), not a {type(raw).__name__}.")
    return raw


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """`key=value` strings -> (key, value) with the value read as YAML (with the file's
    limits), e.g. `launch.gpus=[0,2]`, `model.pretrained=null`. A value of only blanks
    stays a string (`data.list_sep=' '` reaches Python as one space, which YAML would drop).
    from_dict then treats them like the file's keys (`_normalize`)."""
    parsed = []
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if key.startswith("+") and eq:
            raise RecipeError(_plus(key, text))
        if not eq or not key:
            raise RecipeError(f"command line: override '{printable(item)}' is not key=value; "
                              "write e.g. optim.lr=0.05.")
        if text and not text.strip():
            value: Any = text
        else:
            try:
                value = safe_yaml.load(text)
            except safe_yaml.YamlRefused as e:
                raise RecipeError(f"command line: {printable(item)}: {e}.") from None
            except yaml.YAMLError as e:
                if leaf_types().get(key, "").startswith("str"):
                    parsed.append((key, text))  # text keys take text as typed: list_sep=,
                    continue
                problem = printable(getattr(e, "problem", None) or "syntax error")
                raise RecipeError(f"command line: the value of {printable(key)}="
                                  f"{printable(text)} is not valid YAML ({problem}); write a "
                                  "list as [a,b].") from None
        parsed.append((key, value))
    return parsed


def _plus(key: str, text: str) -> str:
    """Hydra's `+key=value` (add a key) or `++key=value`: ffdist's keys all exist, so the
    prefix adds nothing; say whether the key without it is one."""
    bare = key.lstrip("+")
    said = f"command line: {printable(key)}={printable(text)}: ffdist has no '+' prefix (every " \
           "recipe key exists already)"
    if bare in leaf_types():
        return f"{said}; write {printable(bare)}={printable(text)}."
    hint = suggest(bare)
    fix = f"did you mean '{printable(hint)}'?" if hint else \
        f"leave out '{printable(key)}={printable(text)}' (every key is listed in " \
        "docs/recipe-reference.md)."
    return f"{said}, and '{printable(bare)}' is not a recipe key; {fix}"


def _nest(cli: list[tuple[str, Any]]) -> dict[str, Any]:
    """[("optim.lr", 0.1)] -> {"optim": {"lr": 0.1}}; a later key wins over an earlier one
    (wrappers append overrides), a key under a value is a mistake."""
    out: dict[str, Any] = {}
    for key, value in cli:
        if "[" in key or "]" in key or "" in key.split("."):
            raise RecipeError(f"command line: {printable(key)}=...: write a dotted key such as "
                              "optim.lr, and "
                              "a whole list as its value, e.g. launch.gpus=[0,1].")
        *path, last = key.split(".")
        node = out
        for i, part in enumerate(path):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"command line: {printable(key)}=...: "
                                  f"{printable('.'.join(path[:i + 1]))} was given a value, so "
                                  "it has no keys below it.")
            node = child
        node[last] = value
    return out


def _normalize(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Sections are mappings (an empty `optim:` is {}); list keys given one value get a
    one-element list; unknown keys are refused here, before OmegaConf copies the whole
    mapping into its nodes (~0.3 ms per value)."""
    types = leaf_types()
    out: dict[str, Any] = {}
    for name, section in raw.items():
        name = str(name)
        if name in SECTIONS and section is None:
            section = {}
        if name not in SECTIONS and name not in types:  # 'optm.lr' -> did you mean optim.lr
            first = next(iter(section), None) if isinstance(section, dict) else None
            raise RecipeError(_unknown(name if first is None else f"{name}.{first}", source))
        _check_section_value(name, section, source)
        if isinstance(section, dict):
            for k in section:
                if f"{name}.{k}" not in types:
                    raise RecipeError(_unknown(f"{name}.{k}", source))
            section = {k: _as_list_if_needed(f"{name}.{k}", v, source)
                       for k, v in section.items()}
        out[name] = section
    return out


def _unknown(key: str, where: str) -> str:
    hint = suggest(key)
    fix = f"did you mean '{printable(hint)}'?" if hint else "every key is listed in docs/recipe-reference.md."
    return f"{where}: unknown key '{printable(key)}'; {fix}"


def _check_section_value(key: str, value: Any, where: str) -> None:
    if key in SECTIONS and not isinstance(value, dict):
        _, fields = _field_types(f"{key}.x")
        example = next(iter(fields), "name")
        raise RecipeError(
            f"{where}: {key}={value!r}: '{key}' is a section ({', '.join(list(fields)[:4])}, "
            f"...), not a value; set one of its keys, e.g. {key}.{example}=...")


def _as_list_if_needed(key: str, value: Any, where: str = "command line") -> Any:
    annotation = leaf_types().get(key, "")
    if not annotation.startswith("list[") or value is None or isinstance(value, list):
        return value
    if isinstance(value, dict):  # OmegaConf: "Cannot merge incompatible container types"
        raise RecipeError(f"{where}: {key}={value!r} has the wrong type; expected "
                          f"{_type_phrase(key, annotation)}.")
    return [value]


def _from_cli(key: str, cli_keys: list[str]) -> bool:
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in cli_keys)


def _refuse_resolvers(container: Any, source: str, cli_keys: list[str]) -> None:
    """Refuse `${resolver:...}` (oc.env, oc.decode, ...): only `${other.key}` references
    to the recipe itself may be interpolated."""
    for key, value in flatten(container).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and "${" in text and _calls_resolver(text):
                where = "command line" if _from_cli(key, cli_keys) else source
                raise RecipeError(
                    f"{where}: {key}={text!r} calls an interpolation resolver; recipes do "
                    "not read the environment (it would be copied into the saved "
                    "recipe.yaml unseen); write the value, or let the shell expand it on "
                    f"the command line: {key}=$VARIABLE.")


def _calls_resolver(text: str) -> bool:
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser
    from omegaconf.grammar_parser import parse

    try:
        tree = parse(text)
    except Exception:  # not a valid interpolation: OmegaConf's own error explains it
        return False
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, OmegaConfGrammarParser.InterpolationResolverContext):
            return True
        stack.extend(node.getChildren() if hasattr(node, "getChildren") else [])
    return False


def _check_values(rcp: Recipe, source: str, cli_keys: list[str]) -> None:
    """What the schema's types let through: items of the wrong type inside lists, and NUL
    characters (a path with one makes every file call raise ValueError)."""
    kinds = {"list[str]": str, "list[int]": int, "list[float]": (int, float)}
    types = leaf_types()
    for key, value in flatten(rcp.to_dict()).items():
        where = "command line" if _from_cli(key, cli_keys) else source
        want = kinds.get(types.get(key, ""))
        items = value if isinstance(value, list) else [value]
        if want is not None and any(isinstance(v, bool) or not isinstance(v, want) for v in items):
            raise RecipeError(f"{where}: {key}={value!r} has the wrong type; expected "
                              f"{_type_phrase(key, types[key])}.")
        if any(isinstance(v, str) and "\x00" in v for v in items):
            raise RecipeError(f"{where}: {key} contains a NUL character; remove it.")


@functools.cache
def leaf_types() -> dict[str, str]:
    """'optim.lr' -> 'float', 'launch.gpus' -> 'list[int]', for every recipe key."""
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = str(f.type)

    walk(Recipe, "")
    return out


def _explain(e: Exception, source: str, origin: str) -> str:
    from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, ValidationError

    key = getattr(e, "full_key", None) or getattr(e, "key", None) or ""
    where = "command line" if origin != source else source
    if isinstance(e, ConfigKeyError) or "not in" in str(e) or "is not in struct" in str(e):
        return _unknown(key, where)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, InterpolationResolutionError) or type(e).__name__ == "GrammarParseError":
        return (f"{where}: {key}: the interpolation cannot be resolved ({first}); "
                "${other.key} may refer to another recipe key only.")
    if isinstance(e, ValidationError) and key:
        value = getattr(e, "value", None)
        wrong = " has no value (null)" if value is None else f"={value!r} has the wrong type"
        return f"{where}: {key}{wrong}; expected {_type_phrase(key, _expected_type(key))}."
    return f"{where}: {key or 'the recipe'}: {first}."


def _field_types(key: str) -> tuple[type | None, dict[str, Any]]:
    """The dataclass that holds `key`'s last part, and its fields by name."""
    cls: Any = Recipe
    parts = key.split(".")
    for part in parts[:-1]:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        sub = fields.get(part)
        if sub is None or not dataclasses.is_dataclass(sub.default_factory() if callable(
                sub.default_factory) else None):
            return None, {}
        cls = type(sub.default_factory())
    return cls, {f.name: f for f in dataclasses.fields(cls)}


def suggest(key: str) -> str | None:
    """'optim.lrr' -> 'optim.lr'; 'optm.lr' -> 'optim.lr'. None when nothing is close."""
    parts = key.split(".")
    prefix = ".".join(parts[:-1])
    _, fields = _field_types(key)
    if not fields:  # the section itself is misspelled
        top = [f.name for f in dataclasses.fields(Recipe)]
        close = difflib.get_close_matches(parts[0], top, n=1, cutoff=0.6)
        return ".".join([close[0], *parts[1:]]) if close else None
    close = difflib.get_close_matches(parts[-1], list(fields), n=1, cutoff=0.6)
    if not close:
        return None
    return f"{prefix}.{close[0]}" if prefix else close[0]


def _expected_type(key: str) -> str:
    key = re.sub(r"\[\d+\]", "", key)  # launch.gpus[0] -> launch.gpus
    _, fields = _field_types(key)
    f = fields.get(key.split(".")[-1])
    return str(f.type) if f is not None else ""


_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _type_phrase(key: str, annotation: str) -> str:
    """'list[int]' -> 'a list of integers, e.g. launch.gpus=[0,2] (one value alone is a
    one-element list)'; 'int | None' -> 'an integer or null'."""
    key = re.sub(r"\[\d+\]", "", key)
    parts = [p.strip() for p in annotation.split("|")]
    nullable = "None" in parts
    parts = [p for p in parts if p != "None"]
    if len(parts) == 1 and parts[0].startswith("list["):
        item = parts[0][5:-1]
        example = {"str": "[a,b]", "int": "[0,2]", "float": "[0.9,0.999]"}.get(item, "[a,b]")
        phrase = (f"a list of {_WORDS.get(item, item).split(' ', 1)[-1]}s, e.g. {key}={example} "
                  "(one value alone is a one-element list)")
    elif len(parts) == 1 and parts[0] in _WORDS:
        phrase = _WORDS[parts[0]]
    elif len(parts) == 2 and parts[1] == "str" and parts[0] in _WORDS:  # a value or auto
        phrase = "true, false or auto" if parts[0] == "bool" else f"{_WORDS[parts[0]]} or auto"
    else:
        return "the type given in docs/recipe-reference.md"
    return phrase + (" or null" if nullable else "")

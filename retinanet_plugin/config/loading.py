"""Loading a config: safe YAML with ``_BASE_``, merging with clear errors, then validation.

:func:`load_config` builds the plugin's config from a YAML file (with its ``_BASE_`` chain) and
``KEY VALUE`` overrides and checks its values (:mod:`.config_validation`); every problem is one
:class:`~retinanet_plugin.config.validation.ConfigError` that names the file, the key, the value
and the rule broken, instead of a ``KeyError`` or an assertion deep inside yacs, or a crash many
minutes into training.

YAML is read with a safe loader only. detectron2's ``CfgNode.merge_from_file`` falls back to
``yaml.unsafe_load`` for files with Python tags, so a config file such as
``X: !!python/object/apply:os.system ["rm -rf ~"]`` runs a command when it is merely loaded. Here
such a file is refused. The one Python tag allowed is ``!!python/object/apply:eval`` with an
arithmetic expression (numbers, lists, ``+ - * / // % **`` and list comprehensions), which
detectron2's model-zoo ``Base-RetinaNet.yaml`` uses for its anchor sizes; it is computed by a
small interpreter of those constructs, never by Python's ``eval``.

What YAML itself would read wrongly is refused too: a mapping with the same key twice (PyYAML
silently keeps the second, so a section written twice loses the first), a dotted key written as
one key (``SOLVER.BASE_LR: 0.1`` at the top level is a key named so, not ``BASE_LR`` in
``SOLVER``), a file that is not UTF-8 text (an image or a checkpoint given as the config), and
``None`` for a key whose default is a value.
"""

import ast
import difflib
import json
import operator
import os
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import yaml
from fvcore.common.config import BASE_KEY

from detectron2.config import CfgNode, get_cfg
from detectron2.config.compat import downgrade_config, guess_version, upgrade_config
from detectron2.utils.file_io import PathManager

from ..compat.private_api import decode_config_value
from .defaults import add_retinanet_config
from .validation import ConfigError, validate_config, validate_training

__all__ = [
    "ConfigArgumentError",
    "ConfigError",
    "config_sets_key",
    "evaluate_arithmetic",
    "load_config",
    "load_config_text",
    "load_yaml_safely",
]

_EVAL_TAG = "tag:yaml.org,2002:python/object/apply:eval"
_MERGE_TAG = "tag:yaml.org,2002:merge"


# ---------------------------------------------------------------------------------------------
# Safe YAML with _BASE_


_BINARY_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
# Bounds that keep an expression from exhausting memory or time: ``10 ** 10 ** 10`` or a
# comprehension over a huge range would otherwise hang the loader.
_MAX_EXPONENT = 64
_MAX_ITEMS = 10_000


def _evaluate(node: ast.AST, names: Dict[str, Any]) -> Any:
    """Value of an arithmetic expression tree; raises ValueError on any other construct."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, names)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        if len(node.elts) > _MAX_ITEMS:
            raise ValueError("too many items")
        return [_evaluate(element, names) for element in node.elts]
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPS:
        return _UNARY_OPS[type(node.op)](_number(node.operand, names))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPS:
        left, right = _number(node.left, names), _number(node.right, names)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is too large")
        result = _BINARY_OPS[type(node.op)](left, right)
        if not isinstance(result, (int, float)):  # e.g. (-8) ** 0.5 is complex
            raise ValueError(f"{result!r} is not a real number")
        return result
    if isinstance(node, ast.ListComp) and len(node.generators) == 1:
        generator = node.generators[0]
        if generator.ifs or generator.is_async or not isinstance(generator.target, ast.Name):
            raise ValueError("only `[expression for name in list]` comprehensions are allowed")
        items = _evaluate(generator.iter, names)
        if not isinstance(items, list):
            raise ValueError("a comprehension must iterate over a list")
        return [_evaluate(node.elt, {**names, generator.target.id: item}) for item in items]
    raise ValueError(f"{type(node).__name__} is not allowed")


def _number(node: ast.AST, names: Dict[str, Any]) -> float:
    """Value of ``node``, which must be a number (so that e.g. ``[0] * 10**9`` is refused)."""
    value = _evaluate(node, names)
    if not isinstance(value, (int, float)):
        raise ValueError("arithmetic is allowed on numbers only")
    return value


def evaluate_arithmetic(expression: str) -> Any:
    """Value of an arithmetic expression such as ``[[x, x * 2**(1/3)] for x in [32, 64]]``.

    Args:
        expression: numbers, lists and tuples (both give lists), ``+ - * / // % **`` and
            single-loop list comprehensions without conditions.

    Raises:
        ValueError: for a syntax error or any other construct (names, calls, attributes, ...).
    """
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"invalid syntax: {e.msg}") from e
    return _evaluate(tree, {})


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping that holds the same key twice (``key``; ``lines``: where, counted from 1)."""

    def __init__(self, key: Any, lines: Tuple[int, int]):
        super().__init__(f"{key} on lines {lines[0]} and {lines[1]}")
        self.key, self.lines = key, lines


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (PyYAML keeps the last
    silently, so a section written twice loses the first) and computes model-zoo
    ``!!python/object/apply:eval`` values."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        first_line: Dict[Any, int] = {}
        for key_node, _ in node.value:
            # "<<" merges another mapping: its keys may be overridden, as YAML intends.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKeyError(key, (first_line[key], line))
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _construct_eval(loader: _SafeLoader, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.SequenceNode) or len(node.value) != 1:
        raise yaml.constructor.ConstructorError(
            None, None, "!!python/object/apply:eval takes one expression", node.start_mark
        )
    expression = loader.construct_scalar(node.value[0])
    try:
        return evaluate_arithmetic(expression)
    except (ValueError, ArithmeticError) as e:
        raise yaml.constructor.ConstructorError(
            None,
            None,
            f"{expression!r} is not a plain arithmetic expression: {e}",
            node.start_mark,
        ) from e


_SafeLoader.add_constructor(_EVAL_TAG, _construct_eval)


def _merge_dicts(source: Dict[str, Any], target: Dict[str, Any], filename: str) -> None:
    """Merges ``source`` into ``target`` in place (``source`` wins), as fvcore's ``_BASE_``."""
    for key, value in source.items():
        if isinstance(value, dict) and key in target:
            if not isinstance(target[key], dict):
                raise ConfigError(
                    f"{filename}: {key} is a section, but its _BASE_ sets it to a value "
                    f"({target[key]!r})"
                )
            _merge_dicts(value, target[key], filename)
        else:
            target[key] = value


def load_yaml_safely(
    filename: str,
    referenced_by: Optional[str] = None,
    merge_bases: bool = True,
    _chain: Sequence[str] = (),
) -> Dict[str, Any]:
    """The mapping in a YAML config file, merged over its ``_BASE_`` files, loaded safely.

    Like fvcore's ``CfgNode.load_yaml_with_base``: ``_BASE_`` is a path or list of paths,
    relative to the file that names it unless absolute; the file's keys override its bases'.

    Args:
        filename: the config file.
        referenced_by: the config file whose ``_BASE_`` names ``filename``, for error messages.
        merge_bases: False for the file's own keys only (its ``_BASE_`` key dropped), e.g. what
            an ablation config changes relative to its base.

    Raises:
        ConfigError: the file (or a base) does not exist, is a folder, is empty, is not text, is
            not valid YAML (the message gives the line), sets a key twice in one mapping (both
            lines given), is not a mapping, needs unsafe YAML loading (a Python tag), or its
            ``_BASE_`` chain comes back to a file already in it.
    """
    where = f" (the _BASE_ of {referenced_by})" if referenced_by else ""
    if PathManager.isdir(filename):
        raise ConfigError(f"config file {filename}{where} is a folder; name a .yaml file in it")
    if not PathManager.isfile(filename):
        raise ConfigError(f"config file {filename}{where} does not exist")
    real = os.path.realpath(filename) if os.path.exists(filename) else filename
    if real in _chain:
        cycle = " -> ".join([*_chain[_chain.index(real) :], real])
        raise ConfigError(f"{filename}: its _BASE_ chain is a cycle ({cycle}); remove one link")
    with PathManager.open(filename, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {filename}{where} is not a text file (byte {e.start} is not UTF-8 text: "
            "an image, a checkpoint?); name a YAML config file"
        ) from e
    try:
        loaded = yaml.load(text, Loader=_SafeLoader)
    except _DuplicateKeyError as e:
        raise ConfigError(
            f"{filename}{where}: {e.key} is set twice, on lines {e.lines[0]} and "
            f"{e.lines[1]} (YAML would keep only the second); merge them into one"
        ) from e
    except yaml.reader.ReaderError as e:
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError(
            f"config file {filename}{where} is not a text file (control character U+{code:04X} "
            f"at position {e.position}); name a YAML config file"
        ) from e
    except yaml.constructor.ConstructorError as e:
        raise ConfigError(
            f"{filename}{_line(e)}: refusing to load a config that needs unsafe YAML "
            f"(Python object tags can run arbitrary code): {e.problem}"
        ) from e
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{filename}{_line(e)}: invalid YAML: {problem}") from e
    if loaded is None:
        raise ConfigError(
            f"config file {filename}{where} is empty; a config sets keys, or names the config it "
            f"changes with {BASE_KEY}"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{filename}: a config file must be a mapping of keys, not {type(loaded).__name__}"
        )
    if BASE_KEY not in loaded:
        return loaded
    bases = loaded.pop(BASE_KEY)
    if not merge_bases:
        return loaded
    merged: Dict[str, Any] = {}
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str):
            raise ConfigError(f"{filename}: {BASE_KEY} must be a path or a list of paths")
        base = os.path.expanduser(base)
        if not base.startswith(("/", "https://", "http://")):
            base = os.path.join(os.path.dirname(filename), base)
        base_keys = load_yaml_safely(base, referenced_by=filename, _chain=(*_chain, real))
        _merge_dicts(base_keys, merged, filename)
    _merge_dicts(loaded, merged, filename)
    return merged


def _line(error: yaml.YAMLError) -> str:
    """ ", line N, column M" for a YAML error with a position, else ""."""
    mark = getattr(error, "problem_mark", None)
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


# ---------------------------------------------------------------------------------------------
# Merging with clear errors for unknown keys and wrong types


def _dotted_keys(node: CfgNode, prefix: str = "") -> Iterator[str]:
    """Every section and key of ``node`` as a dotted name ("MODEL", "MODEL.RETINANET", ...)."""
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, CfgNode):
            yield from _dotted_keys(value, prefix + key + ".")


def _unknown_key_error(cfg: CfgNode, full_key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(full_key, list(_dotted_keys(cfg)), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{source}: unknown config key {full_key}{hint}")


def _dotted_key_error(
    root: CfgNode, full_key: str, key: str, value: Any, source: str
) -> ConfigError:
    """For ``SOLVER.BASE_LR: 0.1`` written as one key, which YAML reads as a key named so: the
    message shows it nested (from the top, under the closest known name if it is none)."""
    known = list(_dotted_keys(root))
    close = difflib.get_close_matches(full_key, known, n=1)
    if full_key in known or not close:
        what, target = f"not {full_key}", full_key
    else:
        what, target = f"and no {full_key} exists either (did you mean {close[0]}?)", close[0]
    *sections, leaf = target.split(".")
    nested = f"{leaf}: {json.dumps(value, default=str)}"
    for section in reversed(sections):
        nested = f"{section}: {{{nested}}}"
    return ConfigError(
        f"{source}: {key!r} is one key with a dot in its name, {what}; nest it: `{nested}`, or "
        f"{leaf} indented under a {sections[-1]}: line"
    )


def _same_kind(value: Any, default: Any) -> bool:
    """Whether yacs accepts ``value`` for a key whose default is ``default``."""
    if type(value) is type(default) or default is None:
        return True
    if value is None:  # yacs would take it, and a rule or the model fail on it later
        return False
    return isinstance(value, (list, tuple)) and isinstance(default, (list, tuple))


def _type_error(full_key: str, value: Any, default: Any, source: str) -> ConfigError:
    expected = type(default).__name__
    # yacs does not turn an int into a float: `1` for a float key is a common slip.
    int_for_float = isinstance(default, float) and isinstance(value, int)
    hint = " (write it with a decimal point)" if int_for_float else ""
    if value is None:
        hint = f" (None is no {expected}: give one, as the {default!r} it would replace)"
    return ConfigError(
        f"{source}: {full_key} = {value!r} has type {type(value).__name__}, "
        f"expected {expected}{hint}"
    )


def _check_mapping(
    root: CfgNode, node: CfgNode, loaded: CfgNode, source: str, prefix: str = ""
) -> None:
    """Checks that every key in ``loaded`` exists in ``node`` (the section ``prefix`` of
    ``root``) with a value of the same type."""
    for key, value in loaded.items():
        full_key = prefix + key
        if key not in node:
            # An open section (MODEL.TIMM.MODEL_ARGS) takes any key; what reads it checks it.
            if root.key_is_deprecated(full_key) or node.is_new_allowed():
                continue
            if "." in key:
                raise _dotted_key_error(root, full_key, key, value, source)
            raise _unknown_key_error(root, full_key, source)
        default = node[key]
        # yacs turns string values into Python literals ("0.5" -> 0.5) before comparing types.
        value = decode_config_value(value)
        if isinstance(default, CfgNode) != isinstance(value, CfgNode):
            what = "a section of keys" if isinstance(default, CfgNode) else "a single value"
            raise ConfigError(f"{source}: {full_key} = {value!r}, but {full_key} is {what}")
        if isinstance(default, CfgNode):
            _check_mapping(root, default, value, source, full_key + ".")
        elif not _same_kind(value, default):
            raise _type_error(full_key, value, default, source)


def _merge_file(cfg: CfgNode, config_file: str) -> None:
    """Merges ``config_file`` into ``cfg`` like detectron2's ``merge_from_file``, but safely."""
    _merge_mapping(cfg, load_yaml_safely(config_file), config_file)


def _merge_mapping(cfg: CfgNode, mapping: Dict[str, Any], config_file: str) -> None:
    """Merges the keys of a config file (``mapping``, read from ``config_file``) into ``cfg``."""
    loaded = CfgNode(mapping)
    version = loaded.get("VERSION", None)
    if version is None:
        version = guess_version(loaded, config_file)
    if version > cfg.VERSION:
        raise ConfigError(
            f"{config_file}: VERSION = {version}, but this detectron2 reads configs up to "
            f"version {cfg.VERSION}"
        )
    # Older configs name keys the old way: check and merge them into an old-version config, then
    # upgrade the result, as detectron2 does.
    target = cfg if version == cfg.VERSION else downgrade_config(cfg, to_version=version)
    _check_mapping(target, target, loaded, config_file)
    try:
        target.merge_from_other_cfg(loaded)
    except (KeyError, ValueError, AssertionError) as e:  # cases yacs knows beyond the checks above
        raise ConfigError(f"{config_file}: {e}") from e
    if target is not cfg:
        upgraded = upgrade_config(target)
        cfg.clear()
        cfg.update(upgraded)


def _merge_opts(cfg: CfgNode, opts: Sequence[str], source: str) -> None:
    """Merges ``KEY VALUE`` overrides into ``cfg`` with clear errors."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(
            f"{source}: overrides must be KEY VALUE pairs, but {opts[-1]!r} has no value"
        )
    known = []
    for full_key, raw in zip(opts[0::2], opts[1::2]):
        *section_keys, key = full_key.split(".")
        section: Any = cfg
        for part in section_keys:
            if not isinstance(section, CfgNode) or not isinstance(section.get(part), CfgNode):
                raise _unknown_key_error(cfg, full_key, source)
            section = section[part]
        value = decode_config_value(raw)
        if key not in section:
            if not section.is_new_allowed():
                raise _unknown_key_error(cfg, full_key, source)
            section[key] = value  # a new key of an open section (yacs' merge refuses those)
            continue
        if isinstance(section[key], CfgNode):
            raise ConfigError(f"{source}: {full_key} is a section of keys, not a single value")
        if not _same_kind(value, section[key]):
            raise _type_error(full_key, value, section[key], source)
        known += [full_key, raw]
    try:
        cfg.merge_from_list(known)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"{source}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Loading


class ConfigArgumentError(ConfigError, TypeError):
    """An argument of :func:`load_config` of the wrong type (from Python, not from a file)."""


def _check_arguments(config_file: Any, opts: Any) -> None:
    """Refuses what Python would otherwise read wrongly: a string of overrides is iterated
    character by character, a key that is no string fails deep inside yacs."""
    if not isinstance(config_file, (str, os.PathLike)):
        raise ConfigArgumentError(
            f"load_config: config_file must be the path of a YAML file, not "
            f"{type(config_file).__name__} {config_file!r}"
        )
    if isinstance(opts, (str, bytes)) or not isinstance(opts, (list, tuple)):
        split = f" (e.g. {opts!r}.split())" if isinstance(opts, str) else ""
        raise ConfigArgumentError(
            f"load_config: opts must be a list of KEY VALUE strings such as "
            f"['SOLVER.BASE_LR', '0.01'], not {type(opts).__name__} {opts!r}{split}"
        )
    for index, key in enumerate(opts[0::2]):
        if not isinstance(key, str):
            raise ConfigArgumentError(
                f"load_config: opts[{2 * index}] = {key!r} must be a config key (a string such "
                "as 'SOLVER.BASE_LR')"
            )


def load_config(config_file: str, opts: Sequence[str] = (), *, training: bool = False) -> CfgNode:
    """The plugin's config from a file and ``KEY VALUE`` overrides, loaded safely and validated.

    Args:
        config_file: a YAML config (its ``_BASE_`` files are loaded too).
        opts: overrides such as ``["SOLVER.BASE_LR", "0.01"]``, applied after the file.
        training: also check what matters only when training starts from the config
            (:func:`~retinanet_plugin.config.validation.validate_training`).

    Returns:
        The config (not frozen), with the plugin's keys.

    Raises:
        ConfigError: a missing file, invalid or unsafe YAML, an unknown key (with the closest
            known key), a value of the wrong type or an invalid value; the message names the file.
            :class:`ConfigArgumentError` (also a TypeError) for arguments of the wrong type.
    """
    _check_arguments(config_file, opts)
    config_file = os.fspath(config_file)
    if config_file.endswith(".py"):
        raise ConfigError(
            f"{config_file} is a LazyConfig (.py): train it with tools/lazyconfig_train_net.py "
            "(docs/detectron2_tools.md); this command takes YAML configs"
        )
    cfg = get_cfg()
    add_retinanet_config(cfg)
    _merge_file(cfg, config_file)
    return _with_overrides(cfg, config_file, opts, training)


def load_config_text(
    text: str, source: str, opts: Sequence[str] = (), *, training: bool = False
) -> CfgNode:
    """:func:`load_config` on YAML text instead of a file: a config stored in a checkpoint
    (``cfg.dump()``), named ``source`` in errors. The text is read as safely as a file."""
    _check_arguments(source, opts)
    try:
        mapping = yaml.load(text, Loader=_SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: its config is invalid YAML ({e})") from e
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: its config is not a mapping of keys")
    cfg = get_cfg()
    add_retinanet_config(cfg)
    _merge_mapping(cfg, mapping, source)
    return _with_overrides(cfg, source, opts, training)


def _with_overrides(cfg: CfgNode, source: str, opts: Sequence[str], training: bool) -> CfgNode:
    """``cfg`` (read from ``source``) with the overrides ``opts`` merged, then validated."""
    _merge_opts(cfg, opts, f"{source} (command-line overrides)")
    if opts:
        source = f"{source} (with command-line overrides)"
    validate_config(cfg, source)
    if training:
        overridden = set(opts[0::2])
        shortened = "SOLVER.MAX_ITER" in overridden and "SOLVER.WARMUP_ITERS" not in overridden
        validate_training(cfg, source, shortened_run=shortened)
    return cfg


def config_sets_key(config_file: str, opts: Sequence[str], key: str) -> bool:
    """Whether ``key`` (e.g. "MODEL.RETINANET.NUM_CLASSES") is set by ``config_file`` (with its
    ``_BASE_`` chain) or by the ``KEY VALUE`` overrides ``opts``, rather than left at its default.

    Raises:
        ConfigError: ``config_file`` cannot be loaded safely (see ``load_yaml_safely``).
    """
    if key in list(opts)[::2]:
        return True
    # Safe loading: never run the Python tags of an untrusted file.
    node = load_yaml_safely(config_file)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True

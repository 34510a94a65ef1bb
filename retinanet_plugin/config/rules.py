"""Rules on option values, each written once.

A component lists the rules on its constructor's options in an ``OPTION_RULES`` table, mapping
each argument to the config key it comes from and its rule. The constructor checks its arguments
with :func:`check_options`, and config validation checks the config's values with
:func:`config_errors` over the same tables, so a config and a direct Python call are held to the
same rule, with the same words. Keys that no single component owns have their rules in
``config_validation.KEY_RULES`` (config key -> rule), checked by :func:`key_errors`.

Every rule takes a value of any type: a number rule given ``None`` or a string says that it must
be a number instead of failing on the comparison.
"""

import difflib
import math
import numbers
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

from ..errors import UserError

__all__ = [
    "OptionError",
    "OptionRules",
    "Rule",
    "above",
    "at_least",
    "check_options",
    "config_errors",
    "config_value",
    "in_interval",
    "key_errors",
    "one_of",
    "optional",
    "registered_in",
]

# A rule returns None for a good value, else what the value must be ("must be >= 1").
Rule = Callable[[Any], Optional[str]]
# argument name -> (config key, rule)
OptionRules = Dict[str, Tuple[str, Rule]]


class OptionError(UserError, ValueError):
    """An option value that breaks its rule."""


def _is_number(value: Any) -> bool:
    """A real number, numpy's included (bool excluded: yacs keeps True/False apart from
    numbers; NaN excluded, which no comparison holds for)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)


def _closest(value: Any, allowed: Iterable[Any]) -> str:
    """ "; did you mean 'x'?" for the allowed string closest to a string ``value``, else ""."""
    if not isinstance(value, str):
        return ""
    names = [a for a in allowed if isinstance(a, str)]
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.5)
    if not close and value:  # e.g. "gn" for "GN", "Default" for "DefaultAnchorGenerator"
        close = [a for a in names if value.lower() in a.lower()]
    return f"; did you mean {close[0]!r}?" if close else ""


def one_of(allowed: Sequence[Any]) -> Rule:
    text = "must be one of " + ", ".join(repr(a) for a in allowed)
    return lambda value: None if value in allowed else text + _closest(value, allowed)


def registered_in(registry, what: str) -> Rule:
    """A name in a detectron2/fvcore ``Registry``, read when the rule runs (the registries fill
    as modules register into them); ``what`` names the registry's kind in the message."""

    def rule(value) -> Optional[str]:
        if isinstance(value, str) and value in registry:
            return None
        names = sorted(name for name, _ in registry)
        return (
            f"must be a registered {what}{_closest(value, names)} (registered: {', '.join(names)})"
        )

    return rule


def optional(rule: Rule, meaning: str) -> Rule:
    """``rule``, or None (which means ``meaning``)."""

    def check(value) -> Optional[str]:
        broken = None if value is None else rule(value)
        return None if broken is None else f"{broken}, or None ({meaning})"

    return check


def _number_rule(holds: Callable[[float], bool], text: str) -> Rule:
    """A rule on numbers: ``holds(value)`` or ``text`` ("must be >= 1"); a value that is no number
    gets "must be a number >= 1"."""
    not_a_number = text.replace("must be ", "must be a number ", 1)
    return lambda value: (None if holds(value) else text) if _is_number(value) else not_a_number


def at_least(minimum: float) -> Rule:
    return _number_rule(lambda value: value >= minimum, f"must be >= {minimum}")


def above(minimum: float) -> Rule:
    return _number_rule(lambda value: value > minimum, f"must be > {minimum}")


def in_interval(
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
    or_equal_to: Sequence[Any] = (),
    meaning: str = "",
) -> Rule:
    """Inside [low, high] (or open at either end), or one of ``or_equal_to`` (``meaning`` says
    what those special values mean)."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    text = f"must be in {interval}" + (
        f", or {' or '.join(map(repr, or_equal_to))} {meaning}".rstrip() if or_equal_to else ""
    )

    def inside(value) -> bool:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return value in or_equal_to or (above and below)

    return _number_rule(inside, text)


def check_options(rules: OptionRules, **values: Any) -> None:
    """Checks constructor arguments against their rules.

    Raises:
        OptionError: naming each broken argument, its config key, the value and the rule.
    """
    errors = [
        f"{argument} ({key}) = {values[argument]!r}: {broken}"
        for argument, (key, rule) in rules.items()
        if argument in values and (broken := rule(values[argument])) is not None
    ]
    if errors:
        raise OptionError("; ".join(errors))


def config_value(cfg, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def key_errors(cfg, rules: Mapping[str, Rule]) -> Iterator[str]:
    """One "KEY = value: rule" line per config value that breaks its rule (config key -> rule)."""
    for key, rule in rules.items():
        value = config_value(cfg, key)
        broken = rule(value)
        if broken is not None:
            yield f"{key} = {value!r}: {broken}"


def config_errors(cfg, rules: OptionRules) -> Iterator[str]:
    """One "KEY = value: rule" line per config value that breaks its rule."""
    yield from key_errors(cfg, dict(rules.values()))

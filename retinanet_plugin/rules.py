"""Rules on option values, each written once.

A component lists the rules on its constructor's options in an ``OPTION_RULES`` table, mapping
each argument to the config key it comes from and its rule. The constructor checks its arguments
with :func:`check_options`, and config validation checks the config's values with
:func:`config_errors` over the same tables, so a config and a direct Python call are held to the
same rule, with the same words.
"""

from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

from .errors import UserError

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
    "one_of",
]

# A rule returns None for a good value, else what the value must be ("must be >= 1").
Rule = Callable[[Any], Optional[str]]
# argument name -> (config key, rule)
OptionRules = Dict[str, Tuple[str, Rule]]


class OptionError(UserError, ValueError):
    """An option value that breaks its rule."""


def one_of(allowed: Sequence[Any]) -> Rule:
    text = "must be one of " + ", ".join(repr(a) for a in allowed)
    return lambda value: None if value in allowed else text


def at_least(minimum: float) -> Rule:
    return lambda value: None if value >= minimum else f"must be >= {minimum}"


def above(minimum: float) -> Rule:
    return lambda value: None if value > minimum else f"must be > {minimum}"


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

    def rule(value) -> Optional[str]:
        if value in or_equal_to:
            return None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return None if above and below else text

    return rule


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


def config_errors(cfg, rules: OptionRules) -> Iterator[str]:
    """One "KEY = value: rule" line per config value that breaks its rule."""
    for key, rule in rules.values():
        value = config_value(cfg, key)
        broken = rule(value)
        if broken is not None:
            yield f"{key} = {value!r}: {broken}"

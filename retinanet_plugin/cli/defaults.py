"""What the plugin's command-line entry points share: one error convention and options that may
come before or after the ``KEY VALUE`` config overrides.

Every entry point (``train_net.py``, ``python -m retinanet_plugin.predict``,
``python -m retinanet_plugin.plot_metrics``, ``tools/*.py``) runs its ``main`` through
:func:`run`: a :class:`~retinanet_plugin.errors.UserError` or a command-line mistake is printed
as one line ``error: ...`` on stderr with exit status 2 and no traceback; ``--debug`` shows the
traceback instead. Any other exception is a bug and keeps its traceback.
"""

import argparse
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence

from ..compat.private_api import option_actions
from ..errors import UserError

__all__ = [
    "DEBUG_FLAG",
    "DEBUG_HELP",
    "one_line",
    "one_line_errors",
    "parse",
    "run",
    "split_options",
]

DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the traceback of an error about the input instead of its one-line message"
# A detectron2 config key as written in overrides: "SOLVER.BASE_LR", "MODEL.RETINANET.NUM_CLASSES".
_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z][A-Z0-9_]*)+$")


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Makes ``parser`` (e.g. detectron2's ``default_argument_parser()``) raise its mistakes
    (a missing or unknown option, a bad value) as :class:`UserError` instead of printing the
    usage text and exiting."""

    def error(message: str):
        raise UserError(f"{message} (see {parser.prog} --help)")

    parser.error = error
    return parser


def _option_action(by_name: Dict[str, argparse.Action], token: str) -> Optional[argparse.Action]:
    """The action of an option token ("--name", "--name=value", or an unambiguous prefix of a
    long name, as argparse allows), None for a token that is not an option.

    Raises:
        UserError: ``token`` looks like a long option but names none.
    """
    name = token.split("=", 1)[0]
    if name in by_name:
        return by_name[name]
    if not name.startswith("--") or len(name) < 3:
        return None
    candidates = {a for n, a in by_name.items() if n.startswith(name)}
    if len(candidates) == 1:
        return candidates.pop()
    known = sorted(n for n in by_name if n.startswith("--"))
    raise UserError(
        f"unknown option {name}"
        + (" (ambiguous)" if candidates else "")
        + f"; the options are {', '.join(known)}"
    )


def split_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> List[str]:
    """Reorders ``argv`` so that the parser's options (with their values) come first and the
    ``KEY VALUE`` config overrides last, wherever the user put them.

    An option's values end early at the next option or at a config key (``SOLVER.BASE_LR``), so
    ``--register-coco NAME JSON SOLVER.MAX_ITER 10`` is an option missing a value, not a bad
    override.

    Raises:
        UserError: an unknown ``--option``.
    """
    by_name = {name: a for a in option_actions(parser) for name in a.option_strings}
    options: List[str] = []
    overrides: List[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        action = _option_action(by_name, tokens[i])
        if action is None:
            overrides.append(tokens[i])
            i += 1
            continue
        options.append(tokens[i])
        i += 1
        if "=" in options[-1]:
            continue
        wanted = {None: 1, "?": 1}.get(action.nargs, action.nargs)
        required = wanted if isinstance(wanted, int) and action.nargs != "?" else 0
        if not isinstance(wanted, int):  # "*", "+": up to the next option or config key
            wanted = len(tokens)
        values: List[str] = []
        while len(values) < wanted and i < len(tokens):
            token = tokens[i]
            if token.split("=", 1)[0] in by_name or _CONFIG_KEY.match(token):
                break
            values.append(token)
            i += 1
        if len(values) < required:
            metavar = action.metavar or action.dest.upper()
            names = " ".join(metavar) if isinstance(metavar, tuple) else metavar
            got = ", ".join(repr(v) for v in values) or "nothing"
            raise UserError(
                f"{options[-1]} takes {required} value(s), {names}; got {got}"
                + (f" before {tokens[i]!r}" if i < len(tokens) else "")
            )
        options += values
    return options + overrides


def one_line(error: BaseException) -> str:
    """An error's message on one line (the lines of a multi-line message joined by "; ")."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def run(main: Callable[[List[str]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Runs ``main(argv)`` under the error convention; returns its exit status.

    Args:
        main: the entry point's main function, taking the argument list (without ``--debug``).
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        status = main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args`` on :func:`split_options`' order of ``argv``, mistakes raised as
    :class:`UserError` (:func:`one_line_errors`)."""
    return one_line_errors(parser).parse_args(split_options(parser, argv))

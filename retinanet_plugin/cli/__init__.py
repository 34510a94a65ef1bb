"""The command-line front ends (training, predict, plots, environment) and the error
convention they share (:mod:`.defaults`)."""

from .defaults import DEBUG_FLAG, DEBUG_HELP, one_line, one_line_errors, parse, run, split_options

__all__ = [
    "DEBUG_FLAG",
    "DEBUG_HELP",
    "one_line",
    "one_line_errors",
    "parse",
    "run",
    "split_options",
]

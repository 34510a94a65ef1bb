"""The base class of the plugin's errors about bad input, which the command line reports in one
line (:mod:`retinanet_plugin.cli.defaults`).

A :class:`UserError` is something the user can fix: a config key or value, a dataset file, a
weights file, a command-line option, the output folder. Every other exception is a bug (or an
environment failure) and keeps its traceback.
"""

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input that the user can fix. Its message names the file, key or value, says what is
    wrong and how to fix it, and fits on one line (several problems are joined with "; ")."""

"""The error types of bad user input, at the bottom of the import graph so every layer can raise them.

:mod:`spin_mcore.config` re-exports both names; import them from there or from here.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent. The message names the field."""


# Errors caused by the user's input (config, data, paths), whose message names the field, file or
# line: the CLI prints them as one line, without a traceback, wherever a rank raised them.
USER_ERRORS = (ValueError, FileNotFoundError)

"""Errors a user sees as one line (`megaloom: error: ...`), kept free of heavy imports so the CLI can
catch them without loading torch."""


class RunError(Exception):
    """A run that cannot start or go on: a bad checkpoint, repeated non-finite steps, a failed peer.
    The message names what happened, what is kept, and what to do."""


class ConfigError(ValueError):
    """A one-line, user-facing configuration error: the setting, its value and the fix."""

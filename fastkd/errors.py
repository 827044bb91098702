"""The one exception type users see: a problem they can fix, told in one line."""

from __future__ import annotations


class FastkdError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with code 2."""


class ConfigError(FastkdError):
    """A configuration key or value is wrong; the message names the key's full path."""


class DataError(FastkdError):
    """A dataset file, folder or list is missing or unusable; the message names it."""


class CheckpointError(FastkdError):
    """A checkpoint is missing, unreadable or does not match the run; the message names it."""

"""The error vocabulary: what a user can fix is a ``UserError``, which every stage prints as one
line (exit status 2) instead of a traceback; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; its message names the key, file or value at fault."""


class ConfigError(UserError):
    """A config, an override or a path the config names."""


class DataError(UserError):
    """The input data (images, shards, archives), not a config."""


class NumericError(UserError):
    """Training or a model's outputs went non-finite (NaN or inf): a recipe (learning rate, precision,
    clipping) or a model the user can change; nothing non-finite is written as a result."""

"""deadwatch's errors: one family, each message names what is wrong and what is allowed."""


class DeadwatchError(Exception):
    """Base class of every error deadwatch raises on purpose."""


class ConfigError(DeadwatchError, ValueError):
    """A configuration key or value is not allowed."""


class RunLogError(DeadwatchError):
    """A run directory or run log cannot be read."""

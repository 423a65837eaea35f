"""User-facing errors: one line that says what is wrong and how to fix it."""


class DiffuRecError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class DataError(DiffuRecError):
    """A data file, column, id or dataset name is missing or malformed."""


class ConfigError(DiffuRecError):
    """A configuration value is invalid."""

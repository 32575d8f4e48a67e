"""User-facing errors: the CLI prints their one-line message and exits non-zero, with no traceback."""


class MaloraError(Exception):
    """Base class of every error a user can fix by changing a config, a file or a command."""


class ConfigError(MaloraError):
    """A config key holds a bad value; the message names the key."""


class DataError(MaloraError):
    """An input file or record is malformed; the message names the file, line/record and field."""

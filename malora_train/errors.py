"""User-facing errors: the CLI prints their one-line message and exits non-zero, with no traceback."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class MaloraError(Exception):
    """Base class of every error a user can fix by changing a config, a file or a command."""


class ConfigError(MaloraError):
    """A config key holds a bad value; the message names the key."""


class DataError(MaloraError):
    """An input file or record is malformed; the message names the file, line/record and field."""


class OutputError(MaloraError):
    """A file or folder cannot be written (read-only folder, disk full); the message names the path."""


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher), known before any set-up."""
    return int(os.environ.get("RANK", "0"))


def exit_with_error(err: Exception | str, program: str | None = None) -> NoReturn:
    """Exit with status 2 and a one-line message naming the program (by default the running
    ``malora-*`` command), printed once: by rank 0 when several processes run."""
    if launch_rank() == 0:
        if program is None:
            program = os.path.basename(sys.argv[0]) if sys.argv else ""
            program = program if program.startswith("malora-") else "malora-train"
        message = " ".join(str(err).split())
        print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)

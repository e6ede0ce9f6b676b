"""User errors, and how a launcher recognises one in the log of a rank it started."""
from __future__ import annotations

# What `kubellama` prints for a user error (components/core/cli.py); launchers look for it in their ranks' logs.
PREFIX = "kubellama: error: "


class KubellamaError(Exception):
    """An error the user can fix (bad config, bad input, missing file); the CLI prints it on one line."""


class ConfigError(KubellamaError):
    pass


def rank_error(line: str) -> str | None:
    """The user error a rank printed on this log line, if any: what a launcher names when its job fails, instead of
    the scheduler's bare FAILED."""
    at = line.find(PREFIX)
    return line[at + len(PREFIX):].strip() or None if at >= 0 else None

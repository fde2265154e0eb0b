"""Errors a user can act on: each one prints as a single line."""


class SophonError(Exception):
    """Base class: the message is shown to the user as one line, without a traceback."""


class ConfigError(SophonError):
    """params.yaml is malformed or holds a value that is not allowed."""


class UnknownNameError(SophonError):
    """A registry (domains, models, losses, attacks) has no entry of that name."""


class DatasetNotFoundError(SophonError):
    """A real dataset is missing from the data root."""


class CheckpointError(SophonError):
    """A checkpoint is missing, corrupted or does not match its card."""


def unknown(kind: str, name: str, known) -> UnknownNameError:
    return UnknownNameError(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")

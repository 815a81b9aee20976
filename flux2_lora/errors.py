"""The errors a user can cause, one class per kind. Each message is one line that names the file, field or option
and the reason; the command layer (`cli.py`) prints it and picks the exit code. Everything else is a bug.

They live here, at the bottom of the house, so that any module can raise them without importing the module that
owns the topic (and so without import cycles); each topic module re-exports its own.
"""

from __future__ import annotations


class UsageError(Exception):
    """A command-line or input-file mistake (a flag, a manifest, a search space, a prompt suite): exit code 2."""


class RecipeError(ValueError):
    """A recipe value is wrong. The message is one line that starts with the dotted field name."""


class ModelError(RuntimeError):
    """The model cannot be found or loaded; the message says what to do."""


class DataError(ValueError):
    """A dataset problem; the message names the file and the reason."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or written; the message names the path and the reason."""


class LoraFileError(CheckpointError):
    """A LoRA file cannot be used as asked; the message names the file (or field) and the reason."""


class EvalError(ValueError):
    """An evaluation input is unusable; the message is one line naming the file or option and the reason."""


class TrainingError(RuntimeError):
    """A run that cannot finish as asked: printed as one line; the process exits with `exit_code`."""

    exit_code = 1

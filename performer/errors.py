"""Errors about something the user named: a file, a path, a value.

The project's rule: every file, path or value a user names (data, checkpoints,
weights, prompts, config keys) gets ONE line on stderr and exit status 2, never
a traceback. Library code raises a `UserInputError` subclass whose message names
the thing and says what was expected; the CLIs (train.py, eval.py, sample.py)
catch `UserInputError` and print ``error: <message>``.

All of them are ValueErrors, so code that already catches ValueError keeps working.
Other user-facing errors subclass `UserInputError` too: config_utils.ConfigError,
checkpoints.CheckpointError and data.DatasetNotPreparedError.
"""

from __future__ import annotations

import importlib.util
import os


class UserInputError(ValueError):
  """A problem with something the user named (a file, a path, a value); CLIs print
  str(e) as one line and exit 2."""


class DataFileError(UserInputError):
  """A data file (config.data.path, ...) is missing, unreadable or malformed."""


class WeightsFileError(UserInputError):
  """A checkpoint, weights or tokenizer file is missing or not what was expected."""


def require_file(
  path: str | os.PathLike, what: str, error: type[UserInputError] = UserInputError
) -> str:
  """The absolute path of an existing, readable regular file, else `error`.

  `what` names the file in the message, e.g. 'FASTA file' or 'tokenizer file';
  the message says whether the path is missing, a directory or unreadable.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if os.path.isdir(path):
    raise error(f'{what} {path!r} is a directory; expected a file')
  if not os.path.exists(path):
    raise error(f'{what} not found: {path!r}')
  if not os.access(path, os.R_OK):
    raise error(f'cannot read {what} {path!r}: permission denied')
  return path


def os_error_text(e: OSError) -> str:
  """The short reason of an OSError ('Permission denied', ...), without the path."""
  return e.strerror or type(e).__name__


def installed_file(package: str, *parts: str) -> str | None:
  """The path of a file inside an installed package (data shipped in a wheel), found
  without importing it; None if the package is not installed."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  return os.path.join(list(spec.submodule_search_locations)[0], *parts)

"""Log levels for the command lines: progress, results and errors by default; the
libraries' own log lines (jax's backend probing, orbax's per-file and read-only notes)
only with --verbose (or absl's -v), for debugging."""

import logging

from absl import flags

VERBOSE = flags.DEFINE_bool(
  'verbose', False, "Also print the libraries' log lines (jax, orbax, absl) at INFO."
)
LIBRARIES = ('absl', 'jax', 'orbax')


def setup(library_level=logging.WARNING):
  """Our INFO lines on stderr; library lines at `library_level` and above (INFO with
  --verbose or -v)."""
  verbose = VERBOSE.value or flags.FLAGS['verbosity'].value > 0
  for name in LIBRARIES:
    logging.getLogger(name).setLevel(logging.INFO if verbose else library_level)
  logging.getLogger('performer').setLevel(logging.INFO)
  logging.getLogger().setLevel(logging.INFO)

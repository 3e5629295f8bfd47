r"""Train a Performer Zoo model.

  python train.py --config=configs/default.py --workdir=/tmp/protein_uni
  python train.py --config=configs/tiny.py --config.train.num_steps=20 --workdir=/tmp/tiny

Re-running the same command resumes from the newest good checkpoint in --workdir. Config
errors (unknown key, wrong type, unknown attention kind / task / dataset) are printed as ONE
line on stderr and exit with status 2, before anything is built. So is every problem with a
file the user names (a missing or malformed config.data.path, checkpoints, init_from): any
`performer.errors.UserInputError`.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from performer import errors
from performer.training import config_utils, logs

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/tiny.py.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_PROGRESS = flags.DEFINE_enum(
  'progress', 'auto', ['auto', 'on', 'off'], 'Progress bar: auto = only when stderr is a terminal.'
)


def fail(message):
  """One line on stderr, exit status 2: the contract for bad configs and arguments."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl flag parsing, but with a one-line message that names the offending key."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(config_utils.diagnose_argv(argv) or e)


def get_config(argv):
  """The parsed config, validated; any problem becomes one line and exit 2."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if not isinstance(config, ml_collections.ConfigDict):  # config_flags' deferred load error
    fail(config_utils.diagnose_argv(argv) or '--config: could not load the config file')
  try:
    return config_utils.validate(config)
  except config_utils.ConfigError as e:
    fail(e)


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = get_config(sys.argv)
  if not _WORKDIR.value:
    fail('--workdir: missing; pass --workdir=DIR (checkpoints and metrics go there)')
  logs.setup()
  progress = {'auto': None, 'on': True, 'off': False}[_PROGRESS.value]
  try:
    check_data_files(config)
    from performer.training import train_lib  # pylint: disable=g-import-not-at-top

    train_lib.train_and_evaluate(config, _WORKDIR.value, progress=progress)
  except errors.UserInputError as e:
    fail(e)


def check_data_files(config, splits=('train', 'validation', 'test')):
  """A missing or malformed data file fails now, in about a second, not after the model
  is built (the parsed file is cached for the pipeline)."""
  from performer import data  # pylint: disable=g-import-not-at-top

  data.check_files(config.data, splits)


# Errors that describe a fixable problem with something the user named (config keys and
# values, data files, checkpoints, weights): printed as one line, not a traceback.
# ConfigError, CheckpointError and DatasetNotPreparedError are UserInputErrors too.
USER_ERRORS = (errors.UserInputError,)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)

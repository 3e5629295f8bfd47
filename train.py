r"""Train a Performer Zoo model.

  python train.py --config=configs/default.py --workdir=/tmp/protein_uni
  python train.py --config=configs/tiny.py --config.train.num_steps=20 --workdir=/tmp/tiny
  python train.py --workdir=/tmp/tiny --config.train.num_steps=40   # resume, train longer

Re-running the same command resumes from the newest good checkpoint in --workdir. The
workdir's config.json is the run's config: without --config it is read, with the
--config.KEY=VALUE overrides on top; a config (file or overrides) that differs from it in
anything but the schedule (num_steps, log_every, eval_every, eval_batches, checkpoint_every,
keep_checkpoints) is refused. One process trains a workdir at a time (workdir/.lock).

Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint is saved and one line
says so; exit status 130 or 143. A second Ctrl-C aborts at once (the newest complete
checkpoint stays). Config errors (unknown key, wrong type, unknown attention kind / task /
dataset) are printed as ONE line on stderr and exit with status 2, before anything is built.
So is every problem with a file the user names (a missing or malformed config.data.path,
checkpoints, init_from): any `performer.errors.UserInputError`.
"""

import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from performer import errors
from performer.training import config_utils, interrupts, logs, rundir

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Config file, e.g. configs/tiny.py. Optional for an existing run: its workdir/config.json '
  'is read, and --config.KEY=VALUE overrides apply on top of it.',
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_PROGRESS = flags.DEFINE_enum(
  'progress', 'auto', ['auto', 'on', 'off'], 'Progress bar: auto = only when stderr is a terminal.'
)


def fail(message):
  """One line on stderr, exit status 2: the contract for bad configs and arguments."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
  sys.exit(2)


_OVERRIDES = []  # --config.KEY=VALUE without --config: applied to the run's config.json


def has_config_file(argv):
  return any(a == '--config' or a.startswith('--config=') for a in argv[1:])


def split_overrides(argv):
  """(argv without the --config.KEY=VALUE overrides, the overrides as KEY=VALUE), when no
  --config is given: absl knows the override flags only once it has loaded a config file."""
  if has_config_file(argv):
    return argv, []
  rest, overrides, args = argv[:1], [], iter(argv[1:])
  for arg in args:
    if arg == '--':
      rest += [arg, *args]
    elif arg.startswith('--config.'):
      overrides.append(arg[2:] if '=' in arg else f'{arg[2:]}={next(args, "")}')
    else:
      rest.append(arg)
  return rest, overrides


def parse_flags(argv):
  """absl flag parsing, but with a one-line message that names the offending key."""
  given = has_config_file(argv)
  argv, _OVERRIDES[:] = split_overrides(argv)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail((given and config_utils.diagnose_argv(argv)) or e)


def get_config(argv):
  """The run's config: --config with its overrides, else the workdir's config.json with
  them; validated. Any problem becomes one line and exit 2."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  if config is None:
    try:
      from configs import base  # pylint: disable=g-import-not-at-top

      schema = base.get_config()
      config = rundir.load_config(_WORKDIR.value, schema) if _WORKDIR.value else None
      if config is None:
        fail(
          '--config: missing; pass --config=configs/<name>.py, or the --workdir of an '
          'existing run (its config.json is the config)'
        )
      for item in _OVERRIDES:
        config_utils.apply_override(config, item)
    except errors.UserInputError as e:
      fail(e)
  elif not isinstance(config, ml_collections.ConfigDict):  # config_flags' deferred load error
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
  except interrupts.Interrupted as e:  # saved: one line, 130 (SIGINT) or 143 (SIGTERM)
    print(e, file=sys.stderr)
    sys.exit(e.exit_status)


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
  # Ctrl-C before training starts, or a second one during it, ends the process at once and
  # silently; training itself handles the first one (performer/training/interrupts.py).
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  app.run(main, flags_parser=parse_flags)

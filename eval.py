r"""Evaluate the newest checkpoint of a run: loss, accuracy, perplexity (bits/dim for images).

  python eval.py --config=configs/default.py --workdir=/tmp/protein_uni [--split=test]

Uses the stored random features and no dropout, so repeated runs print the same numbers.
Bad configs, a missing or malformed data file and a workdir without a usable checkpoint
(any `performer.errors.UserInputError`): one line on stderr, exit status 2.
"""

import logging
import sys

from absl import app, flags

import train  # the shared flag definitions and one-line error handling
from performer import errors
from performer.training import logs

_SPLIT = flags.DEFINE_enum('split', 'both', ['validation', 'test', 'both'], 'Split to evaluate.')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 0, 'Batches per split; 0 = all.')


def main(argv):
  if len(argv) > 1:
    train.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = train.get_config(sys.argv)
  workdir = train._WORKDIR.value  # pylint: disable=protected-access
  if not workdir:
    train.fail("--workdir: missing; pass the training run's --workdir")
  logs.setup(logging.ERROR)  # orbax's read-only notes are expected here
  splits = ('validation', 'test') if _SPLIT.value == 'both' else (_SPLIT.value,)
  try:
    train.check_data_files(config, ('train', *splits))  # train: the unigram baseline
    from performer.training import train_lib  # pylint: disable=g-import-not-at-top

    train_lib.evaluate_checkpoint(config, workdir, splits, num_batches=_EVAL_BATCHES.value)
  except errors.UserInputError as e:
    train.fail(e)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=train.parse_flags)

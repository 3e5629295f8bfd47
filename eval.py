r"""Evaluate the newest checkpoint of a run: loss, accuracy, perplexity (bits/dim for images).

  python eval.py --workdir=/tmp/protein_uni [--split=test]
  python eval.py --workdir=/tmp/smollm2_favor --text_file=notes.txt [--teacher] [--max_tokens=4096]

The run's own config is read from its workdir/config.json; a --config, if given, must agree
with it (the schedule keys aside), as train.py's resume rule says (performer/training/
rundir.py). Uses the stored random features and no dropout, so repeated runs print the
same numbers.
--text_file scores any UTF-8 file with the model's own tokenizer instead of the held-out
splits (per-token perplexity, causal_lm only; performer/training/text_eval.py); --teacher
scores the original model (train.distill_from, else train.init_from) on the same tokens.
Bad configs, a missing or malformed data or text file and a workdir without a usable
checkpoint (any `performer.errors.UserInputError`): one line on stderr, exit status 2.
"""

import logging
import sys

from absl import app, flags

import train  # the shared flag definitions and one-line error handling
from performer import errors
from performer.training import logs, rundir

flags.declare_key_flag('config')  # train.py's flags, listed by --help
flags.declare_key_flag('workdir')

_SPLIT = flags.DEFINE_enum('split', 'both', ['validation', 'test', 'both'], 'Split to evaluate.')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 0, 'Batches per split; 0 = all.')
_TEXT_FILE = flags.DEFINE_string(
  'text_file', None, 'Score this UTF-8 text file (per-token perplexity) instead of the splits.'
)
_TEACHER = flags.DEFINE_bool(
  'teacher', False, 'With --text_file: also score train.distill_from (else train.init_from).'
)
_MAX_TOKENS = flags.DEFINE_integer(
  'max_tokens', 0, 'With --text_file: score only the first N tokens; 0 = all.'
)


def main(argv):
  if len(argv) > 1:
    train.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = train.get_config(sys.argv)
  workdir = train._WORKDIR.value  # pylint: disable=protected-access
  if not workdir:
    train.fail("--workdir: missing; pass the training run's --workdir")
  if not _TEXT_FILE.value and (_TEACHER.value or _MAX_TOKENS.value):
    train.fail('--teacher and --max_tokens go with --text_file=PATH')
  logs.setup(logging.ERROR)  # orbax's read-only notes are expected here
  splits = ('validation', 'test') if _SPLIT.value == 'both' else (_SPLIT.value,)
  try:
    check_run_config(config, workdir)
    if _TEXT_FILE.value:
      from performer.training import text_eval  # pylint: disable=g-import-not-at-top

      result = text_eval.score_text(
        config, workdir, _TEXT_FILE.value, teacher=_TEACHER.value, max_tokens=_MAX_TOKENS.value
      )
      print('\n'.join(text_eval.format_table(result)))
      return
    train.check_data_files(config, ('train', *splits))  # train: the unigram baseline
    from performer.training import train_lib  # pylint: disable=g-import-not-at-top

    train_lib.evaluate_checkpoint(config, workdir, splits, num_batches=_EVAL_BATCHES.value)
  except errors.UserInputError as e:
    train.fail(e)


def check_run_config(config, workdir):
  """The run is scored with its own config: one that differs from its config.json in more
  than the schedule is a UserInputError (one line)."""
  from performer.training import build  # pylint: disable=g-import-not-at-top

  if rundir.load_config(workdir) is not None:
    hint = "leave out --config and the overrides of these keys: eval.py reads the run's config"
    rundir.check_config(build.resolve_config(config)[0], workdir, hint)


if __name__ == '__main__':
  app.run(main, flags_parser=train.parse_flags)

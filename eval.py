r"""Evaluate the newest checkpoint of a run: loss, accuracy, perplexity (bits/dim for images).

  python eval.py --workdir=/tmp/protein_uni [--split=test]
  python eval.py --workdir=/tmp/smollm2_favor --text_file=notes.txt [--teacher] [--max_tokens=4096]
  python eval.py --workdir=/tmp/linearize_smollm2 --long_context \
      --lengths=1024,2048,4096,8192 [--trials=10] [--teacher] [--json=long.json] [--plot=long.png]

The run's own config is read from its workdir/config.json; a --config, if given, must agree
with it (the schedule keys aside), as train.py's resume rule says (performer/training/
rundir.py). Uses the stored random features and no dropout, so repeated runs print the
same numbers.
--text_file scores any UTF-8 file with the model's own tokenizer instead of the held-out
splits (per-token perplexity, causal_lm only; performer/training/text_eval.py); --teacher
scores the original model (train.distill_from, else train.init_from) on the same tokens.
--long_context measures retrieval (passkey, needle), perplexity by position and chunked
prefill cost at each of --lengths (performer/training/long_context.py); --text_file then
names the text for perplexity by position, --teacher adds the original on the same prompts.
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
_LONG_CONTEXT = flags.DEFINE_bool(
  'long_context', False, 'Passkey, needle, perplexity by position and prefill cost by length.'
)
_LENGTHS = flags.DEFINE_list('lengths', ['1024', '2048', '4096', '8192'], 'Prompt lengths.')
_TRIALS = flags.DEFINE_integer('trials', 10, 'With --long_context: prompts per task and length.')
_SEED = flags.DEFINE_integer('seed', 0, 'With --long_context: seed of the keys and needles.')
_PREFILL_CHUNK = flags.DEFINE_integer('prefill_chunk', 512, 'Tokens per chunked-prefill call.')
_TASKS = flags.DEFINE_list('tasks', ['passkey', 'needle'], 'With --long_context: retrieval tasks.')
_PPL_WINDOWS = flags.DEFINE_integer('ppl_windows', 2, 'Held-out windows for perplexity.')
_JSON = flags.DEFINE_string('json', None, 'With --long_context: write the results here.')
_PLOT = flags.DEFINE_string(
  'plot',
  None,
  'With --long_context: the passkey depth x length heatmap (PNG); default: beside --json.',
)


def main(argv):
  if len(argv) > 1:
    train.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config = train.get_config(sys.argv)
  workdir = train._WORKDIR.value  # pylint: disable=protected-access
  if not workdir:
    train.fail("--workdir: missing; pass the training run's --workdir")
  if not (_TEXT_FILE.value or _LONG_CONTEXT.value) and _TEACHER.value:
    train.fail('--teacher goes with --text_file=PATH or --long_context')
  if (_LONG_CONTEXT.value or not _TEXT_FILE.value) and _MAX_TOKENS.value:
    train.fail('--max_tokens goes with --text_file=PATH')
  logs.setup(logging.ERROR)  # orbax's read-only notes are expected here
  splits = ('validation', 'test') if _SPLIT.value == 'both' else (_SPLIT.value,)
  try:
    check_run_config(config, workdir)
    if _LONG_CONTEXT.value:
      return long_context(config, workdir)
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


def long_context(config, workdir):
  """eval.py --long_context: the table on stdout, JSON and heatmap where asked."""
  from performer.training import long_context as lc  # pylint: disable=g-import-not-at-top
  from performer.training import long_context_report as report  # pylint: disable=g-import-not-at-top

  try:
    lengths = tuple(int(n) for n in _LENGTHS.value)
  except ValueError:
    train.fail(f'--lengths: comma-separated token counts expected, got {_LENGTHS.value}')
  settings = lc.Settings(
    lengths=lengths,
    trials=_TRIALS.value,
    seed=_SEED.value,
    prefill_chunk=_PREFILL_CHUNK.value,
    text_file=_TEXT_FILE.value,
    ppl_windows=_PPL_WINDOWS.value,
    tasks=tuple(_TASKS.value),
  )
  result = lc.run(config, workdir, settings, teacher=_TEACHER.value)
  print('\n'.join(report.format_table(result)))
  if _JSON.value:
    report.write_json(_JSON.value, result)
  plot = _PLOT.value or (_JSON.value and _JSON.value.rsplit('.', 1)[0] + '.png')
  if plot and 'passkey' in settings.tasks:
    report.plot_heatmap(result, plot)


def check_run_config(config, workdir):
  """The run is scored with its own config: one that differs from its config.json in more
  than the schedule is a UserInputError (one line)."""
  from performer.training import build  # pylint: disable=g-import-not-at-top

  if rundir.load_config(workdir) is not None:
    hint = "leave out --config and the overrides of these keys: eval.py reads the run's config"
    rundir.check_config(build.resolve_config(config)[0], workdir, hint, rundir.EVAL_KEYS)


if __name__ == '__main__':
  app.run(main, flags_parser=train.parse_flags)

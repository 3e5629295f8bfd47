"""Load, override, lock and validate experiment configs.

Configs are Python files with a `get_config()` returning an `ml_collections.ConfigDict` (as in
big_vision). They are locked after loading so that a typo -- in a variant file or in a
`--config.train.batch_sze=8` override -- is an error rather than a setting that silently
does nothing. Every error raised here is a `ConfigError` whose message is ONE line naming the
offending key, because train.py / eval.py print exactly that line and exit with status 2.
"""

import ast
import difflib
import importlib.util
import os
import re
import sys

import ml_collections

from performer import errors

SCHEDULES = ('cosine', 'constant')
DISTILL_TARGETS = ('logits', 'hidden')


class ConfigError(errors.UserInputError):
  """A bad config; `str(error)` is a single line that names the key."""


def _one_line(text):
  return ' '.join(str(text).split())


def load_config(path, overrides=()):
  """Loads `get_config()` from a config file, applies `key=value` overrides and locks it.

  Args:
    path: path of a config file (e.g. 'configs/tiny.py').
    overrides: strings like 'train.batch_size=8' or 'config.model.attention.kind=softmax'.
  Returns:
    A locked ConfigDict.
  """
  if not os.path.isfile(path):
    raise ConfigError(f'--config: no such config file {path!r}')
  # Config files import their base as `from configs import base`, so the directory that
  # holds `configs/` must be importable even when running from elsewhere.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if os.path.isdir(os.path.join(root, 'configs')) and root not in sys.path:
    sys.path.insert(0, root)
  name = '_performer_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    missing = re.search(r'Key "([^"]+)" does not exist', str(e))
    if missing:  # a variant file setting a key the (locked) base schema does not have
      hint = re.search(r'Did you mean "([^"]+)"', str(e))
      raise ConfigError(
        f'--config={path}: sets unknown config key {missing.group(1)!r}'
        + (f' (did you mean {hint.group(1)!r}?)' if hint else '')
      ) from e
    raise ConfigError(f'--config={path}: {type(e).__name__}: {_one_line(e)}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config={path}: get_config() must return a ConfigDict')
  config.lock()
  for item in overrides:
    apply_override(config, item)
  return config


def _parse_value(text, old):
  """Parses an override string with the type of the current value (absl-like)."""
  if isinstance(old, bool):
    low = text.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise ValueError(f'expected a bool, got {text!r}')
  if isinstance(old, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, tuple) and not isinstance(value, tuple):
    value = (value,)
  if type(value) is not type(old):  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f'expected {type(old).__name__}, got {text!r}')
  return value


def _did_you_mean(name, node):
  if not isinstance(node, ml_collections.ConfigDict):
    return ''
  close = difflib.get_close_matches(name, list(node.keys()), n=1)
  return f' (did you mean {close[0]!r}?)' if close else ''


def apply_override(config, item):
  """Applies one 'a.b.c=value' override to a locked config, with a one-line error."""
  if '=' not in item:
    raise ConfigError(f'override {item!r}: expected key=value')
  key, text = item.split('=', 1)
  key = key.strip().lstrip('-')
  if key.startswith('config.'):
    key = key[len('config.') :]
  *parents, leaf = key.split('.')
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(
        f"unknown config key 'config.{'.'.join(parents[: i + 1])}'" + _did_you_mean(part, node)
      )
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"unknown config key 'config.{key}'" + _did_you_mean(leaf, node))
  old = node[leaf]
  if isinstance(old, ml_collections.ConfigDict):
    raise ConfigError(f'config.{key} is a group of settings; set one of its fields')
  try:
    node[leaf] = _parse_value(text, old)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.{key}: {_one_line(e)}') from e


def diagnose_argv(argv):
  """Re-parses `--config=... --config.k=v` arguments to name the key absl choked on.

  absl / config_flags report an unknown override as a bare KeyError('nope') without the
  path; this replays the same arguments through `load_config` to get a precise message.
  Returns the message, or None when everything parses here.
  """
  path, overrides = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(args):
      path = args[i + 1]
    elif arg.startswith('--config.'):
      if '=' not in arg and i + 1 < len(args):
        arg = f'{arg}={args[i + 1]}'
      overrides.append(arg)
  if path is None:
    return '--config: missing; pass --config=configs/<name>.py'
  try:
    load_config(path, overrides)
  except ConfigError as e:
    return str(e)
  return None


def _check_choice(key, value, choices):
  if value not in choices:
    raise ConfigError(f'config.{key}: unknown value {value!r}; choose from {", ".join(choices)}')


def _check_positive(config, keys, allow_zero=False):
  for key in keys:
    value = config
    for part in key.split('.'):
      value = value[part]
    if value < 0 or (value == 0 and not allow_zero):
      raise ConfigError(f'config.{key}: must be {">= 0" if allow_zero else "> 0"}, got {value}')


def validate_model(config):
  """config.model through the models' own checks (families.model_config: choices, sizes,
  the task's image shape, attention options), as a ConfigError naming the key. A
  data-derived vocab_size of 0 is checked as 1."""
  from performer import models  # pylint: disable=g-import-not-at-top

  fields = config.model.to_dict()
  fields['vocab_size'] = fields['vocab_size'] or 1
  try:
    models.model_config(fields)
  except models.ModelConfigError as e:
    raise ConfigError(f'config.model.{_one_line(e)}') from e
  except ValueError as e:
    raise ConfigError(f'config.model: {_one_line(e)}') from e


def validate(config):
  """The one pass over a config, before anything is built: names, ranges, divisibility,
  the model (unless a gguf:/hf: init_from decides it: build.resolve_config checks it once
  filled in) and the training stages. Raises ConfigError; returns `config`."""
  from performer import data  # pylint: disable=g-import-not-at-top
  from performer.convert.pretrained import is_pretrained  # pylint: disable=g-import-not-at-top

  _check_choice('data.name', config.data.name, data.NAMES)
  _check_choice('data.crop', config.data.crop, data.CROPS)
  _check_choice('train.schedule', config.train.schedule, SCHEDULES)
  pretrained = is_pretrained(config.train.init_from)
  if not pretrained:
    validate_model(config)
  _check_positive(
    config,
    [
      'data.seq_len',
      'train.batch_size',
      'train.num_steps',
      'train.grad_accum_steps',
      'train.log_every',
      'train.keep_checkpoints',
      'mesh.fsdp',
      'mesh.seq',
    ],
  )
  _check_positive(
    config,
    [
      'train.warmup_steps',
      'train.time_limit_minutes',
      'train.weight_decay',
      'train.grad_clip',
      'train.redraw_every',
      'train.eval_every',
      'train.checkpoint_every',
      'model.attention.num_features',
      'model.attention.chunk_size',
    ],
    allow_zero=True,
  )
  if config.train.batch_size % config.train.grad_accum_steps:
    raise ConfigError(
      f'config.train.grad_accum_steps: {config.train.grad_accum_steps} does not '
      f'divide config.train.batch_size={config.train.batch_size}'
    )
  if not 0.0 < config.train.mlm_mask_rate < 1.0:
    raise ConfigError(
      f'config.train.mlm_mask_rate: must be in (0, 1), got {config.train.mlm_mask_rate}'
    )
  if (
    not pretrained
    and config.model.positions in ('learned', 'axial')
    and config.model.max_len < config.data.seq_len
  ):
    raise ConfigError(
      f'config.model.max_len: {config.model.max_len} < config.data.seq_len='
      f'{config.data.seq_len} with learned positions'
    )
  if config.mesh.data == 0 or config.mesh.data < -1:
    raise ConfigError(f'config.mesh.data: must be -1 (all devices) or > 0, got {config.mesh.data}')
  _check_sequence_split(config)
  _check_stages(config)
  _check_teacher(config)
  return config


def _check_stages(config):
  """`train.trainable` and the attention-transfer stage."""
  from performer.convert import attention_transfer  # pylint: disable=g-import-not-at-top
  from performer.training import optim  # pylint: disable=g-import-not-at-top

  tc = config.train
  _check_choice('train.trainable', tc.trainable, optim.TRAINABLE)
  if tc.trainable == 'lora' and not config.model.lora_rank:
    raise ConfigError('config.train.trainable=lora needs config.model.lora_rank > 0')
  if not 0 <= tc.transfer_steps <= tc.num_steps:
    raise ConfigError(f'config.train.transfer_steps: {tc.transfer_steps} is not in [0, num_steps]')
  if tc.transfer_steps and not tc.distill_from:
    raise ConfigError(
      'config.train.transfer_steps: attention transfer learns from a softmax teacher; set '
      'config.train.distill_from (e.g. the same source as init_from)'
    )
  _check_choice('train.transfer_loss', tc.transfer_loss, attention_transfer.LOSSES)


def _check_teacher(config):
  """A task that learns from a teacher names one; a teacher's distillation settings."""
  from performer import models, tasks  # pylint: disable=g-import-not-at-top

  tc = config.train
  family = models.FAMILIES.get(config.model.family)  # unknown: a pretrained init_from says so
  task = tasks.TASKS.get(family.fixed.get('task', config.model.task) if family else None)
  if task is not None and task.needs_teacher and not tc.distill_from:
    raise ConfigError(
      f'config.train.distill_from: the {task.name} task learns from its softmax original; '
      'name it (e.g. the same hf:DIR as init_from)'
    )
  if not tc.distill_from:
    return
  _check_choice('train.distill_target', tc.distill_target, DISTILL_TARGETS)
  if not tc.distill_temperature > 0 or tc.distill_weight < 0:
    raise ConfigError(
      'config.train.distill_temperature must be > 0 and config.train.distill_weight >= 0'
    )


def _check_sequence_split(config):
  """mesh.seq > 1: each device's span is whole chunks and at least a window long."""
  seq, length = config.mesh.seq, config.data.seq_len
  if seq == 1:
    return
  if length % seq:
    raise ConfigError(f'config.mesh.seq: {seq} does not divide data.seq_len={length}')
  chunk = config.model.attention.chunk_size
  if chunk and (length // seq) % chunk:
    raise ConfigError(
      f'config.mesh.seq: data.seq_len / mesh.seq = {length // seq} positions per device is '
      f'not a multiple of model.attention.chunk_size={chunk}'
    )
  if config.model.attention.get('sparse_cache', 0):
    raise ConfigError(
      'config.mesh.seq: attention.sparse_cache runs its chunks in order on one device; '
      'use mesh.seq=1'
    )
  window = config.model.attention.window
  if window > length // seq:
    raise ConfigError(
      f'config.mesh.seq: attention.window={window} is longer than the {length // seq} '
      'positions per device'
    )

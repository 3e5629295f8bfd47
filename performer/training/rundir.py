"""A run's directory belongs to one run: its config.json is the run's config, and one process
trains it at a time.

* `load_config(workdir)`: the run's resolved config, from `workdir/config.json` (written by
  training), or None for a new workdir. train.py, eval.py and sample.py start from it.
* `differences(stored, config)`: what a config changes against the run's. Only the keys in
  `SCHEDULE_KEYS` (when to stop, log, evaluate and checkpoint) may change on resume; every
  other key shapes the model, its state or its data, and must match. `check_config`
  raises a one-line `RunConfigError` naming the keys that do not.
* `lock(workdir)`: `workdir/.lock`, held with `fcntl.flock` by the training process and
  holding its pid. A second train.py on the workdir gets a one-line `WorkdirLockedError`;
  the kernel drops the lock when its process dies, so a lock file whose process is gone
  (killed, crashed) is taken over with a warning. eval.py and sample.py only read.
"""

import contextlib
import errno
import json
import logging
import os
import socket

import ml_collections

from performer import errors

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# The only settings a resumed run may change: they say when to stop, log, evaluate and
# checkpoint, never what is trained or on what. Everything else must match the run's.
SCHEDULE_KEYS = frozenset(
  {
    'train.num_steps',
    'train.log_every',
    'train.eval_every',
    'train.eval_batches',
    'train.checkpoint_every',
    'train.keep_checkpoints',
    'train.time_limit_minutes',
  }
)
# Inference-time switches: they change how eval.py and sample.py run a checkpoint, never
# what it holds, so those two accept them on top of the run's config (train.py does not):
# the window's length (its gain is per head, whatever the length) and its ablation,
# LoLA's sparse cache (needs no retraining) and its storage dtype, attention sinks,
# whose one new parameter starts neutral (restore.py keeps it at its zero init), the
# linear part's decay (a fixed half-life, no parameter) and the rotary clamp of far
# exact keys (none either); and the context held-out text is scored at
# (`data.seq_len`: `eval.py --text_file` at 256 and 512 tokens).
EVAL_KEYS = frozenset(
  {
    'model.attention.window_off',
    'model.attention.window',
    'model.attention.sparse_cache',
    'model.attention.sparse_cache_dtype',
    'model.attention.sparse_cache_leave_one_out',
    'model.attention.sinks',
    'model.attention.linear_half_life',
    'model.attention.rope_clamp',
    'data.seq_len',
  }
)
# A key added to the schema after a run was written is missing from its config.json; new
# keys arrive with a neutral default (off, 0), which is what the old run did.
_NEUTRAL = (0, False, '', None)
_SHOWN = 6  # differing keys named in one error line


class RunConfigError(errors.UserInputError):
  """A config that differs from the run's own (workdir/config.json), or an unreadable one."""


class WorkdirLockedError(errors.UserInputError):
  """Another live process is training this workdir."""


# ---------------------------------------------------------------------------- config


def _tuples(value):
  """JSON lists back to the tuples the schema uses (config.model.image_shape)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _fill(schema, stored):
  """`schema` (unlocked) with every value of `stored` written over it."""
  for key, value in stored.items():
    if isinstance(value, dict) and isinstance(schema.get(key), ml_collections.ConfigDict):
      _fill(schema[key], value)
    else:
      schema[key] = value
  return schema


def load_config(workdir, schema=None):
  """The run's config (a locked ConfigDict) from workdir/config.json; None if there is none.
  With `schema` (today's base config), keys newer than the run's config.json take their
  default there (new keys arrive off), so an older run still validates and resumes."""
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise RunConfigError(f'{path}: unreadable run config ({e})') from e
  if not isinstance(raw, dict) or not isinstance(raw.get('model'), dict):
    raise RunConfigError(f'{path}: not a run config (written by train.py)')
  if schema is None:
    config = ml_collections.ConfigDict(_tuples(raw))
  else:
    config = _fill(schema.copy_and_resolve_references(), _tuples(raw))
  config.lock()
  return config


def _flat(config, prefix=''):
  """{dotted key: JSON value} of a ConfigDict or of a dict read from JSON."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


NOT_SET = '<not set>'


def differences(stored, config):
  """(changed, schedule): [(key, run's value, this value)] for keys that must match and for
  SCHEDULE_KEYS, between the run's config and a resolved `config`."""
  old, new = _flat(stored), _flat(config)
  changed, schedule = [], []
  order = ('model', 'data', 'seed', 'train')  # the model's keys named first
  rank = lambda key: (order.index(key.split('.')[0]) if key.split('.')[0] in order else 9, key)
  for key in sorted(set(old) | set(new), key=rank):
    a, b = old.get(key, NOT_SET), new.get(key, NOT_SET)
    if a == NOT_SET and b in _NEUTRAL:  # 0.0 and False compare equal to 0
      continue
    if a != b:
      (schedule if key in SCHEDULE_KEYS else changed).append((key, a, b))
  return changed, schedule


def _describe(diffs, limit=_SHOWN):
  parts = [f'{key} (run: {a!r}, now: {b!r})' for key, a, b in diffs[:limit]]
  if len(diffs) > limit:
    parts.append(f'and {len(diffs) - limit} more')
  return ', '.join(parts)


def check_config(config, workdir, hint, allowed=frozenset()):
  """Raises a RunConfigError if the resolved `config` differs from workdir's config.json in
  a key outside SCHEDULE_KEYS and `allowed`; `hint` says what to do. Returns the schedule
  differences."""
  stored = load_config(workdir)
  if stored is None:
    return []
  changed, schedule = differences(stored, config)
  changed = [d for d in changed if d[0] not in allowed]
  if changed:
    raise RunConfigError(
      f'--workdir {workdir} holds a run with another config: {_describe(changed)}; {hint}'
    )
  return schedule


def has_checkpoints(workdir):
  """Whether workdir/checkpoints holds a finalized step (tmp dirs of killed saves do not
  count)."""
  path = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


RESUME_HINT = (
  'resume it with its own config (leave out --config: train.py reads config.json; only '
  f'{", ".join(sorted(k.split(".")[-1] for k in SCHEDULE_KEYS))} may change), '
  'or use another --workdir'
)


def check_resume(config, workdir):
  """Before training `config` in workdir: a run with checkpoints there must have the same
  config up to SCHEDULE_KEYS (else RunConfigError, nothing touched); changed schedule keys
  are logged in one line. A workdir with a config.json but no checkpoint holds nothing to
  resume: the new config replaces it."""
  if not has_checkpoints(workdir):
    stored = load_config(workdir)
    if stored is not None and differences(stored, config)[0]:
      log.warning('%s has no checkpoint yet: starting over with the new config', workdir)
    return []
  schedule = check_config(config, workdir, RESUME_HINT)
  if schedule:
    log.info(
      'resuming with a new schedule: %s',
      ', '.join(f'{key} {a} -> {b}' for key, a, b in schedule),
    )
  return schedule


# ---------------------------------------------------------------------------- lock


def _read_holder(fd):
  """(pid, host) recorded in the lock file, or None when it is empty or unreadable."""
  try:
    text = os.pread(fd, 200, 0).decode('utf-8', 'replace').split()
    return int(text[0]), (text[1] if len(text) > 1 else '')
  except (OSError, ValueError, IndexError):
    return None


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _busy(workdir, holder):
  who = f'pid {holder[0]} on {holder[1]}' if holder else 'another process'
  return WorkdirLockedError(
    f'--workdir {workdir} is being trained by {who}; wait for it to finish or stop it '
    '(it saves and exits on Ctrl-C or SIGTERM), or use another --workdir'
  )


@contextlib.contextmanager
def lock(workdir, enabled=True):
  """Holds workdir/.lock while training (process 0 of a multi-host job; `enabled=False`
  elsewhere). Raises WorkdirLockedError if a live process holds it."""
  if not enabled:
    yield None
    return
  import fcntl  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd, acquired = os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):  # held by a live process
        raise _busy(workdir, holder) from None
      # No flock on this file system: trust the recorded pid, if it is on this host.
      if holder and holder[1] == socket.gethostname() and _alive(holder[0]):
        raise _busy(workdir, holder) from None
    holder = _read_holder(fd)
    if holder and holder[0] != os.getpid():
      log.warning(
        '%s: taking over the stale lock of pid %d on %s, which is no longer running',
        path,
        holder[0],
        holder[1] or '?',
      )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()} {socket.gethostname()}\n'.encode(), 0)
    acquired = True
    yield path
  finally:
    # Emptied, never deleted: deleting a flock'ed file lets two processes lock two inodes.
    if acquired:
      with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # releases the flock

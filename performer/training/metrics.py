"""Metric sinks: JSON lines, TensorBoard, config.json, and a progress bar.

`workdir/metrics.jsonl` is the record tests and notebooks read (one object per line:
{"step", "split", ...}); TensorBoard event files (tensorboardX, so no TensorFlow) are for
people. Only process 0 writes. The progress bar goes to stderr and is off when stderr is not
a terminal, so logs and test output stay clean.
"""

import json
import os
import sys

import jax


class MetricWriter:
  """Appends metrics to workdir/metrics.jsonl and TensorBoard (process 0 only).

  `start_step` is where a training run (re)starts: its checkpoint's step, or 0. Rows logged
  after it by an earlier process (killed after that checkpoint, or before the first one) are
  dropped (JSON lines rewritten, TensorBoard purge_step), and so are final evaluations at
  it (this run evaluates at its own end), so the record reads like one uninterrupted run.
  None (the default) only appends.
  """

  def __init__(self, workdir, start_step=None, enable_tensorboard=True):
    self.active = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'metrics.jsonl')
    if start_step is not None and os.path.exists(path):
      keep = [
        r
        for r in read_metrics(workdir)
        if r['step'] < start_step or (r['step'] == start_step and 'final_' not in r['split'])
      ]
      with open(path + '.tmp', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)
      os.replace(path + '.tmp', path)
    self._jsonl = open(path, 'a', encoding='utf-8')
    if enable_tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      purge = None if start_step is None else start_step + 1
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=purge)

  def write(self, step, split, values):
    if not self.active:
      return
    values = {k: float(v) for k, v in values.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'split': split, **values}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(f'{split}/{key}', value, int(step))

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None


def write_config(config, workdir):
  """Saves the exact config of the run as workdir/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def read_metrics(workdir, split=None):
  """Reads metrics.jsonl back as a list of dicts (optionally one split)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r['split'] == split]


class Progress:
  """A tqdm bar with steps/s and tokens/s; a no-op when stderr is not a TTY."""

  def __init__(self, total, initial, enabled=None):
    enabled = sys.stderr.isatty() if enabled is None else enabled
    self._bar = None
    if enabled and jax.process_index() == 0:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top

      self._bar = tqdm(
        total=total, initial=initial, unit='step', dynamic_ncols=True, file=sys.stderr
      )

  def advance(self, steps=1):
    if self._bar is not None:
      self._bar.update(steps)

  def set_rates(self, steps_per_sec, tokens_per_sec):
    """Shows rates measured by the loop between host syncs (per-step timing would only
    measure the asynchronous dispatch)."""
    if self._bar is not None:
      self._bar.set_postfix_str(f'{steps_per_sec:.2f} steps/s, {tokens_per_sec:,.0f} tokens/s')

  def write(self, text):
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()

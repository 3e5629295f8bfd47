"""Ctrl-C and preemption during training: finish the step, save, stop cleanly.

`catching()` is held around the training loop. The first SIGINT or SIGTERM only records the
signal; the loop checks it between steps (and between eval batches), saves a checkpoint at
the current step (atomically, as every save: orbax writes a tmp directory and renames it),
waits for the save, flushes the metrics and raises `Interrupted`, whose message is the one
line train.py prints before exiting with 128 + the signal number (130, 143). The handler
also puts back the handlers that were there before, so a second signal does what it would
have done without us: in train.py (SIGINT set to SIG_DFL) it ends the process at once,
before the save completes; the newest complete checkpoint is untouched, since an
unfinished save is only a tmp directory.

Multi-host jobs install no handler: JAX's preemption service turns the cluster's SIGTERM
into a step all hosts agree on, and the loop asks orbax's `reached_preemption(step)` at
every step (on all hosts, as that protocol requires), then saves and stops the same way.
"""

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active = None  # the Stop of the innermost catching() in progress, shared when nested


class Interrupted(KeyboardInterrupt):
  """Training stopped on a signal after saving a checkpoint at `step`."""

  def __init__(self, signum, step):
    self.signum, self.step = int(signum), int(step)
    self.exit_status = 128 + self.signum  # the shell's convention: 130 SIGINT, 143 SIGTERM
    super().__init__(
      f'interrupted at step {self.step}; checkpoint saved; run the same command to resume'
    )

  def __str__(self):
    return self.args[0]


class Stop:
  """What the loop asks between steps: has a signal (or, multi-host, a preemption) come?"""

  def __init__(self, multihost=False):
    self.multihost = multihost
    self.signum = None

  def pending(self):
    """A signal was received by this process (cheap, no collective: for eval loops)."""
    return self.signum is not None

  def at_step(self, manager, step):
    """Whether to save and stop at `step`; multi-host, every host must call this at every
    step (orbax's preemption sync point)."""
    if self.multihost and self.signum is None and manager.reached_preemption(step):
      self.signum = signal.SIGTERM
    return self.signum is not None


def _restore(previous):
  for signum, handler in previous.items():
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def catching():
  """Yields a `Stop` that the first SIGINT / SIGTERM sets (single process, main thread)."""
  global _active
  if _active is not None:
    yield _active
    return
  import jax  # pylint: disable=g-import-not-at-top  (train.py imports this module early)

  stop = Stop(multihost=jax.process_count() > 1)
  previous = {}

  def handler(signum, frame):  # pylint: disable=unused-argument
    if stop.signum is None:
      stop.signum = signum
    _restore(previous)  # a second signal: whatever it did before (train.py: abort)

  if not stop.multihost and threading.current_thread() is threading.main_thread():
    for signum in SIGNALS:
      previous[signum] = signal.signal(signum, handler)
  _active = stop
  try:
    yield stop
  finally:
    _active = None
    _restore(previous)

"""Run by tests/test_interrupts.py: train.py in this process, which sends itself signals
while the checkpoint of one step is being saved (the save started, orbax's write still in
flight), the case in which a KeyboardInterrupt used to end in a thousand-line traceback.

  python tests/interrupt_worker.py STEP SIGNALS [train.py flags...]

STEP: the step whose save is interrupted; SIGNALS: e.g. 'INT' or 'TERM', or 'INT,INT' for
a second Ctrl-C.
"""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from performer.training import checkpoints  # noqa: E402

STEP, SIGNALS = int(sys.argv[1]), [getattr(signal, f'SIG{s}') for s in sys.argv[2].split(',')]
_save = checkpoints.save


def save(manager, step, trees, meta):
  _save(manager, step, trees, meta)  # returns once the arrays are on the host; writes go on
  if step == STEP:
    for signum in SIGNALS:
      os.kill(os.getpid(), signum)


checkpoints.save = save
sys.argv = [os.path.join(ROOT, 'train.py'), *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name='__main__')

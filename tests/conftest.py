"""Shared test setup: import path, tiny configs and a helper to run train.py.

The repository is not pip-installed in the dev venv, so the repo root goes on sys.path
(and on PYTHONPATH for subprocesses). Everything here is sized for a 2-core machine.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Compile time dominates these tests on a 2-core CPU. A compilation cache shared by this
# session's processes (set before JAX is imported; subprocesses inherit it) lets identical
# programs -- the tiny config's step in the kill / resume / reference runs -- compile once.
# It changes no numerics (the cached executable is the one that would be compiled), starts
# empty every session and is deleted at exit.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='performer_test_jax_cache_')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
# Every program, not only those that take over a second to compile: the many small ones
# (eager ops, tiny models) recur across tests, workers and the scripts they start.
# Measured on 2 cores: 482 s against 566 s for the default run, 18% less CPU time.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

# The tests compare float32 algorithms (chunked == scan == quadratic, decode == forward) to
# ~1e-5. On a GPU, XLA's default float32 matmul is TF32 (10-bit mantissa, errors ~1e-3), so
# ask for true float32 there, in this process and in the scripts it starts; on the CPU it
# changes nothing. (Measured on an H200: without it 77 such comparisons failed at ~1e-3.)
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

# The adaptive and learned feature maps: their model-level runs of the generic
# every-kind tests (models, decoding, training, transfer) are marked slow, to keep the
# default run under 15 minutes on 2 cores. What is particular to them runs by default in
# test_feature_maps.py, and the attention-level every-kind tests (no future leak, masks,
# segments, decoding, gradients) keep them too.
SLOW_KINDS = ('favor_plus_plus', 'favor_sharp', 'hedgehog')


def kind_params(kinds, keep=()):
  """`kinds` for parametrize, with the SLOW_KINDS (except those in `keep`) marked slow."""
  return [
    pytest.param(k, marks=pytest.mark.slow) if k in SLOW_KINDS and k not in keep else k
    for k in kinds
  ]


# The attention-level every-kind tests keep this one of them in the default run: its code
# path (moments, alignment, FAVOR++ logits) covers FAVOR++'s too.
DEFAULT_NEW_KIND = ('favor_sharp',)


def tiny_config(**overrides):
  """configs/tiny.py with 'a.b=value'-style overrides given as keyword a__b=value."""
  from performer.training import config_utils  # pylint: disable=g-import-not-at-top

  items = [f'{k.replace("__", ".")}={v}' for k, v in overrides.items()]
  return config_utils.load_config(os.path.join(ROOT, 'configs', 'tiny.py'), items)


def subprocess_env(**extra):
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env.update(extra)
  return env


def run_script(args, timeout=300, **env):
  """Runs `python <args...>` from the repo root; returns the CompletedProcess."""
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=subprocess_env(**env),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


@pytest.fixture
def tiny():
  return tiny_config

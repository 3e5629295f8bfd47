"""'english_docs': whole documents of the stdlib's own English (pydoc topics and
docstrings), for fine-tuning at longer contexts offline. Built into a temporary cache
folder, so a test run never writes to (or trusts) ~/.cache/performer_zoo."""

import os

import ml_collections
import numpy as np
import pytest

from performer import data
from performer.data import english
from performer.data import text as text_lib


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """The cache folder of every english_* dataset in this module, with english_docs built."""
  folder = tmp_path_factory.mktemp('english')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(english, 'CACHE_DIR', str(folder))
    english.docs_path()
    yield folder


def docs_cfg(**kw):
  cfg = ml_collections.ConfigDict(
    dict(name='english_docs', path='', seq_len=256, crop='random', pack=True, vocab_size=600)
  )
  cfg.update(kw)
  return cfg


def test_corpus_is_megabytes_of_documents_and_deterministic(cache, tmp_path):
  path = english.docs_path()
  assert path == os.path.join(cache, 'english_docs.txt')
  raw = open(path, 'rb').read()
  lines = raw.decode('utf-8').splitlines()
  assert len(raw) > 1_000_000 and len(lines) > 1000
  assert len(set(lines)) == len(lines) and all(line == ' '.join(line.split()) for line in lines)
  assert not [f for f in os.listdir(cache) if f.startswith('.english_docs')]  # no temp left
  # A second, independent build (another folder) writes the same bytes.
  assert open(english.docs_path(str(tmp_path)), 'rb').read() == raw


def test_held_out_documents_are_never_trained_on(cache):
  cfg = docs_cfg()
  train = set(data.dataset_for(cfg).source(cfg, 'train'))
  held = [set(data.dataset_for(cfg).source(cfg, s)) for s in ('validation', 'test')]
  assert all(held) and not (held[0] & held[1]) and not any(train & h for h in held)
  total = len(train) + sum(map(len, held))
  assert 0.85 < len(train) / total < 0.95


def test_batches_window_long_documents(cache, monkeypatch):
  monkeypatch.setattr(text_lib, 'SPM_MAX_CHARS', 200_000)  # a small, quick tokenizer
  cfg = docs_cfg()
  vocab = data.vocab_for(cfg)
  assert vocab.size <= 600 and vocab.path.startswith(str(cache))
  batch = next(data.build_dataset(cfg, split='train', batch_size=4, seed=0))
  assert batch['tokens'].shape == (4, 256) and batch['tokens'].dtype == np.int32
  assert batch['mask'].mean() > 0.5  # packed documents fill most of each row
  assert np.all((batch['tokens'] >= 0) & (batch['tokens'] < vocab.size))
  first = next(data.build_dataset(docs_cfg(pack=False), split='validation', batch_size=2))
  assert first['mask'].all()  # the first 256 tokens of a long document
  doc = data.dataset_for(cfg).source(cfg, 'validation')[0]
  assert doc.startswith(vocab.decode(first['tokens'][0]))

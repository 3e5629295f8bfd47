"""The uniref50/trembl TFDS builders and pipeline, on a tiny FASTA fixture (no network).

The builder really runs: FASTA in tmp_path -> manual dir -> TFDS GeneratorBasedBuilder ->
ArrayRecord shards, read back through tfds.data_source and grain.
"""

import os
import random

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from performer import data
from performer.data import catalog, sequences, uniref
from performer.data.dataset import split_of
from performer.data.protein import with_specials
from performer.data.vocab import PROTEIN_VOCAB

STANDARD = 'ACDEFGHIKLMNPQRSTVWY'


def fixture_records(n=90, seed=0):
  """(id, raw sequence) pairs; a few use lowercase, J (-> X), B/O/U/Z and a final '*'."""
  rng = random.Random(seed)
  records = []
  for i in range(n):
    seq = ''.join(rng.choice(STANDARD) for _ in range(rng.randint(5, 70)))
    if i % 10 == 1:
      seq = seq.lower()
    if i % 10 == 2:
      seq = 'BOUZJ' + seq + '*'
    records.append((f'UniRef50_P{i:05d}', seq))
  return records


def write_fasta(path, records, width=30):
  with open(path, 'w') as f:
    for rid, seq in records:
      f.write(f'>{rid} n=1 Tax=Test\n')
      for k in range(0, len(seq), width):
        f.write(seq[k : k + width] + '\n')
  return str(path)


def data_cfg(data_dir, **kw):
  cfg = ml_collections.ConfigDict(
    dict(name='uniref50', path='', seq_len=24, crop='random', pack=False, data_dir=str(data_dir))
  )
  cfg.update(kw)
  return cfg


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('uniref')
  records = fixture_records()
  fasta_path = write_fasta(root / 'mini.fasta', records)
  path = uniref.prepare('uniref50', str(root / 'data'), fasta_path=fasta_path)
  return {'data_dir': str(root / 'data'), 'records': records, 'path': path}


def test_builder_writes_array_record_splits(prepared):
  files = os.listdir(prepared['path'])
  for split in ('train', 'validation', 'test'):
    assert any(f.startswith(f'uniref50-{split}.array_record-') for f in files), files
    source = tfds.data_source(
      'uniref50', split=split, data_dir=prepared['data_dir'], download=False
    )
    got = {
      r['id'].decode(): r['sequence'].decode() for r in (source[i] for i in range(len(source)))
    }
    want = {
      rid: PROTEIN_VOCAB.normalize(seq)
      for rid, seq in prepared['records']
      if split_of(rid) == split
    }
    assert got == want and got  # every record, in its hash split, normalised
  # Non-standard residues as the vocabulary defines them: J -> X, B/O/U/Z kept, '*' gone.
  rid, raw = prepared['records'][2]
  assert PROTEIN_VOCAB.normalize(raw).startswith('BOUZX') and not raw[5:-1].count('*')
  # Preparing again is a no-op returning the same directory.
  assert uniref.prepare('uniref50', prepared['data_dir']) == prepared['path']


def test_pipeline_batches_crops_and_windows(prepared):
  cfg = data_cfg(prepared['data_dir'])
  batch = next(data.build_dataset(cfg, split='train', batch_size=4, seed=0))
  assert batch['tokens'].shape == (4, 24) and batch['tokens'].dtype == np.int32
  assert batch['mask'].dtype == bool and batch['segment_ids'].dtype == np.int32
  np.testing.assert_array_equal(batch['mask'], batch['segment_ids'] > 0)
  assert batch['tokens'].max() < PROTEIN_VOCAB.size
  other = next(data.build_dataset(cfg, split='train', batch_size=4, seed=1))
  assert not np.array_equal(batch['tokens'], other['tokens'])
  # Eval: fixed windows (the first seq_len tokens of each record), filler rows at the end.
  source = catalog.split_source(uniref.SPECS['uniref50'], 'test', prepared['data_dir'])
  want = [
    with_specials(PROTEIN_VOCAB.encode_array(source[i]['sequence']))[:24]
    for i in range(len(source))
  ]
  rows = [
    r
    for b in data.build_dataset(cfg, split='test', batch_size=4)
    for r in zip(b['tokens'], b['mask'])
  ]
  assert len(rows) % 4 == 0 and len(rows) - len(want) < 4
  for (tokens, mask), w in zip(rows, want):
    np.testing.assert_array_equal(tokens[mask], w)
  assert not any(m.any() for _, m in rows[len(want) :])
  assert data.vocab_for(cfg) is PROTEIN_VOCAB


def test_packing_round_trip(prepared):
  cfg = data_cfg(prepared['data_dir'], pack=True, seq_len=64)
  source = catalog.split_source(uniref.SPECS['uniref50'], 'validation', prepared['data_dir'])
  want = sorted(
    tuple(with_specials(PROTEIN_VOCAB.encode_array(source[i]['sequence']))[:64])
    for i in range(len(source))
  )
  got = [
    seg
    for b in data.build_dataset(cfg, split='validation', batch_size=2)
    for seg in sequences.unpack(b)
  ]
  assert sorted(map(tuple, got)) == want
  train = data.build_dataset(cfg, split='train', batch_size=2, seed=0)
  assert max(next(train)['segment_ids'].max() for _ in range(5)) > 1  # rows hold several


def test_worker_processes_give_the_same_kind_of_batches(prepared):
  cfg = data_cfg(prepared['data_dir'], pack=True, seq_len=48, num_workers=1)
  it = data.build_dataset(cfg, split='train', batch_size=2, seed=0)
  batch = next(it)
  assert batch['tokens'].shape == (2, 48) and batch['segment_ids'].dtype == np.int32
  state = it.get_state()
  following = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)['tokens'], following['tokens'])


def test_malformed_record_names_the_record(tmp_path):
  records = fixture_records(12)
  records[5] = ('UniRef50_BROKEN', 'ACDE1FGH')
  path = write_fasta(tmp_path / 'bad.fasta', records)
  with pytest.raises(ValueError, match='UniRef50_BROKEN'):
    uniref.prepare('uniref50', str(tmp_path / 'data'), fasta_path=path)
  assert not os.path.exists(tmp_path / 'data' / 'uniref50' / '1.0.0')


def test_manual_dir_with_two_fasta_files_is_an_error(tmp_path):
  manual = tmp_path / 'manual'
  manual.mkdir()
  write_fasta(manual / 'a.fasta', fixture_records(3))
  write_fasta(manual / 'b.fa', fixture_records(3))
  with pytest.raises(ValueError, match='several FASTA files'):
    uniref.prepare('trembl', str(tmp_path / 'data'), manual_dir=str(manual))


@pytest.mark.slow
def test_tiny_uniref50_training_run(prepared, tmp_path, tiny):
  from performer.training import train_lib  # pylint: disable=g-import-not-at-top

  config = tiny(
    data__name='uniref50',
    data__data_dir=prepared['data_dir'],
    data__seq_len=32,
    model__max_len=32,
    train__num_steps=3,
    train__eval_every=0,
    train__checkpoint_every=0,
    train__redraw_every=0,
    train__log_every=1,
    train__batch_size=2,
  )
  out = train_lib.train_and_evaluate(config, str(tmp_path / 'work'), progress=False)
  assert out['step'] == 3 and np.isfinite(out['final']['validation']['loss'])

"""The protein pipeline against the data contract, on the bundled sample and tiny fixtures."""

import collections
import math

import ml_collections
import numpy as np
import pytest

from performer import data, errors
from performer.data import dataset, fasta, protein
from performer.data.vocab import PROTEIN_VOCAB as V


def config(**kw):
  base = dict(name='protein_sample', path='', seq_len=32, crop='random', pack=False, data_dir='')
  base.update(kw)
  return ml_collections.ConfigDict(base)


def take(it, n):
  return [next(it) for _ in range(n)]


def segments(batches):
  """Unpacks rows by segment id: the token streams, as tuples, in order."""
  out = []
  for b in batches:
    for toks, seg in zip(b['tokens'], b['segment_ids']):
      out += [tuple(toks[seg == s].tolist()) for s in range(1, seg.max() + 1)]
  return out


def ids_for(split, n, prefix='r'):
  """The first n ids 'r0', 'r1', ... that the hash split puts in `split`."""
  found, i = [], 0
  while len(found) < n:
    if dataset.split_of(f'{prefix}{i}') == split:
      found.append(f'{prefix}{i}')
    i += 1
  return found


@pytest.fixture(scope='module')
def small_fasta(tmp_path_factory):
  """5 train records (lengths 60..140) and 2 of each eval split, random residues."""
  rng = np.random.default_rng(0)
  lines = []
  for split, n in (('train', 5), ('validation', 2), ('test', 2)):
    for k, rid in enumerate(ids_for(split, n)):
      seq = ''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 60 + 20 * k))
      lines += [f'>{rid} {split}', seq[:50], seq[50:]]
  path = tmp_path_factory.mktemp('fa') / 'small.fa'
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def sequences(path, split):
  return [s for rid, _, s in fasta.parse_fasta(path) if dataset.split_of(rid) == split]


# --- vocabulary --------------------------------------------------------------


def test_vocab_layout_and_round_trip():
  vocab = data.vocab_for(config())
  assert (vocab.size, vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.mask_id) == (29, 0, 1, 2, 3)
  assert vocab.encode('ACY') == [4, 5, 23] and vocab.encode('BOUXZ') == [24, 25, 26, 27, 28]
  seq = 'MKVLAACDEFGHIKLMNPQRSTVWYBOUXZ'
  assert vocab.decode(vocab.encode(seq, add_bos=True, add_eos=True)) == seq
  assert vocab.encode('mkj*') == vocab.encode('MKX')
  assert vocab.decode([1, 4, 3, 2, 0], show_special=True) == '<bos>A<mask><eos><pad>'
  with pytest.raises(ValueError, match="invalid character '1'"):
    vocab.encode('MK1')
  with pytest.raises(ValueError, match='outside the protein vocabulary'):
    vocab.decode([29])


# --- corpus and splits -------------------------------------------------------


def test_bundled_sample_has_2100_records():
  corpus = protein.SAMPLE.corpus(config())
  assert len(corpus.ids) == 2100 == corpus.stats.records
  assert corpus.stats.empty_skipped == 0
  assert sum(len(r) for r in corpus.residues) == corpus.stats.residues


def test_splits_disjoint_deterministic_and_about_90_5_5():
  corpus = protein.SAMPLE.corpus(config())
  parts = [set(corpus.splits[s].tolist()) for s in data.SPLITS]
  assert sum(map(len, parts)) == len(set.union(*parts)) == 2100
  assert 0.85 < len(parts[0]) / 2100 < 0.95 and all(len(p) > 50 for p in parts[1:])
  assert [dataset.split_of(corpus.ids[i]) for i in corpus.splits['validation']] == (
    ['validation'] * len(parts[1])
  )
  assert dataset.split_of('938293.PRJEB85.HG003688_1') == dataset.split_of(
    '938293.PRJEB85.HG003688_1'
  )


# --- batches -----------------------------------------------------------------


def check_batch(b, batch_size, seq_len):
  assert set(b) == {'tokens', 'mask', 'segment_ids'}
  assert b['tokens'].shape == b['mask'].shape == b['segment_ids'].shape == (batch_size, seq_len)
  assert (b['tokens'].dtype, b['mask'].dtype, b['segment_ids'].dtype) == (np.int32, bool, np.int32)
  np.testing.assert_array_equal(b['mask'], b['segment_ids'] > 0)
  assert (b['tokens'][~b['mask']] == V.pad_id).all() and (b['tokens'][b['mask']] != V.pad_id).all()


@pytest.mark.parametrize('pack', [False, True])
def test_train_batch_shapes_and_masks(pack):
  for b in take(data.build_dataset(config(pack=pack), split='train', batch_size=4, seed=0), 3):
    check_batch(b, 4, 32)
    if not pack:
      assert set(np.unique(b['segment_ids']).tolist()) <= {0, 1}


def test_short_sequences_are_padded(small_fasta):
  cfg = config(name='fasta', path=small_fasta, seq_len=200)
  rows = next(data.build_dataset(cfg, split='train', batch_size=5, seed=0))
  lengths = sorted(rows['mask'].sum(1).tolist())
  assert lengths == [62, 82, 102, 122, 142]  # residues + BOS + EOS, the rest PAD
  assert all(
    r[0] == V.bos_id and r[n - 1] == V.eos_id for r, n in zip(rows['tokens'], rows['mask'].sum(1))
  )


def test_random_crop_reproducible_and_differs_across_epochs(small_fasta):
  cfg = config(name='fasta', path=small_fasta, seq_len=16)
  first = take(data.build_dataset(cfg, split='train', batch_size=1, seed=3), 10)
  again = take(data.build_dataset(cfg, split='train', batch_size=1, seed=3), 10)
  other = take(data.build_dataset(cfg, split='train', batch_size=1, seed=4), 10)
  assert all((a['tokens'] == b['tokens']).all() for a, b in zip(first, again))
  assert any((a['tokens'] != b['tokens']).any() for a, b in zip(first, other))
  # Locate each window in its source: every record appears once per epoch,
  # and its crop offset changes between epoch 1 and epoch 2.
  full = ['\x01' + s + '\x02' for s in sequences(small_fasta, 'train')]
  offsets, order = collections.defaultdict(list), []
  for b in first:
    window = ''.join({1: '\x01', 2: '\x02'}.get(t, V.decode([t])) for t in b['tokens'][0])
    (k,) = [k for k, f in enumerate(full) if window in f]
    offsets[k].append(full[k].index(window))
    order.append(k)
  assert sorted(order[:5]) == sorted(order[5:]) == list(range(5))
  assert order[:5] != order[5:]  # reshuffled every epoch
  assert any(v[0] != v[1] for v in offsets.values())


def test_eval_windows_fixed_in_order_and_each_example_once(small_fasta):
  cfg = config(name='fasta', path=small_fasta, seq_len=16, crop='random')
  batches = list(data.build_dataset(cfg, split='validation', batch_size=3))
  assert len(batches) == 1
  expected = [
    V.encode(s, add_bos=True, add_eos=True)[:16] for s in sequences(small_fasta, 'validation')
  ]
  assert [r.tolist() for r in batches[0]['tokens'][:2]] == expected
  assert not batches[0]['mask'][2].any()  # final partial batch padded with an all-masked row
  again = list(data.build_dataset(cfg, split='validation', batch_size=3))
  np.testing.assert_array_equal(again[0]['tokens'], batches[0]['tokens'])


def test_eval_on_sample_sees_every_example_exactly_once():
  cfg = config(seq_len=32)
  batches = list(data.build_dataset(cfg, split='test', batch_size=8))
  n = len(protein.SAMPLE.corpus(cfg).splits['test'])
  assert len(batches) == math.ceil(n / 8)
  assert sum(int(b['mask'].any(1).sum()) for b in batches) == n
  assert all(
    b['tokens'][b['mask'].any(1), 0].tolist() == [V.bos_id] * int(b['mask'].any(1).sum())
    for b in batches
  )


def test_packing_round_trips_eval():
  cfg = config(seq_len=256, pack=True)
  batches = list(data.build_dataset(cfg, split='validation', batch_size=4))
  for b in batches:
    check_batch(b, 4, 256)
  corpus = protein.SAMPLE.corpus(cfg)
  expected = [
    tuple(protein.with_specials(corpus.residues[i])[:256].tolist())
    for i in corpus.splits['validation']
  ]
  got = segments(batches)
  assert collections.Counter(got) == collections.Counter(expected)
  assert max(b['segment_ids'].max() for b in batches) > 1  # something really was packed


def test_packing_round_trips_train(small_fasta):
  cfg = config(name='fasta', path=small_fasta, seq_len=200, crop='start', pack=True)
  batches = list(data.build_dataset(cfg, split='train', batch_size=1, seed=0, num_epochs=1))
  for b in batches:
    check_batch(b, 1, 200)
    seg = b['segment_ids'][0]
    real = seg[seg > 0]
    assert (np.diff(real) >= 0).all() and set(real.tolist()) == set(range(1, real.max() + 1))
  expected = [
    tuple(V.encode(s, add_bos=True, add_eos=True)) for s in sequences(small_fasta, 'train')
  ]
  assert sorted(segments(batches)) == sorted(expected)
  assert len(batches) < 5


def test_shards_disjoint(small_fasta):
  cfg = config(name='fasta', path=small_fasta, seq_len=200, crop='start')
  rows = []
  for shard in range(2):
    batches = list(
      data.build_dataset(
        cfg, split='train', batch_size=1, seed=0, num_epochs=1, shard_index=shard, shard_count=2
      )
    )
    rows.append(set(segments(batches)))
  assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == 5
  # Eval: shards are disjoint, cover the split, and yield the same number of batches.
  cfg = config(seq_len=32)
  ev = [
    list(data.build_dataset(cfg, split='validation', batch_size=8, shard_index=s, shard_count=3))
    for s in range(3)
  ]
  assert len({len(e) for e in ev}) == 1
  sets = [set(segments(e)) for e in ev]
  n = len(protein.SAMPLE.corpus(cfg).splits['validation'])
  assert sum(map(len, sets)) == len(set.union(*sets)) == n


def test_iterator_state_resumes():
  it = data.build_dataset(config(pack=True), split='train', batch_size=2, seed=0)
  take(it, 2)
  state = it.get_state()
  want = take(it, 2)
  resumed = data.build_dataset(config(pack=True), split='train', batch_size=2, seed=0)
  resumed.set_state(state)
  for a, b in zip(want, take(resumed, 2)):
    np.testing.assert_array_equal(a['tokens'], b['tokens'])


def test_unigram_baseline():
  result = data.unigram_baseline(config(seq_len=128))
  assert math.isfinite(result['cross_entropy']) and 2.5 < result['cross_entropy'] < math.log(25)
  assert result['perplexity'] == pytest.approx(math.exp(result['cross_entropy']))
  assert result['num_tokens'] > 1000


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match='valid names: protein_sample, fasta'):
    data.build_dataset(config(name='nope'), split='train', batch_size=2)
  with pytest.raises(ValueError, match='config.data.path must name a FASTA file'):
    data.build_dataset(config(name='fasta'), split='train', batch_size=2)
  with pytest.raises(errors.DataFileError, match='missing.fa'):
    data.build_dataset(
      config(name='fasta', path=str(tmp_path / 'missing.fa')), split='train', batch_size=2
    )
  with pytest.raises(ValueError, match='crop'):
    data.build_dataset(config(crop='middle'), split='train', batch_size=2)
  with pytest.raises(ValueError, match='split must be one of'):
    data.build_dataset(config(), split='valid', batch_size=2)
  with pytest.raises(ValueError, match='shard_index'):
    data.build_dataset(config(), split='train', batch_size=2, shard_index=2, shard_count=2)
  tiny = tmp_path / 'tiny.fa'
  tiny.write_text('>' + ids_for('train', 1)[0] + '\nMKV\n')
  with pytest.raises(ValueError, match="'validation' split is empty"):
    data.build_dataset(config(name='fasta', path=str(tiny)), split='validation', batch_size=2)


def test_unigram_baseline_reports_majority_accuracy():
  from ml_collections import ConfigDict

  from performer import data

  cfg = ConfigDict(
    {'name': 'protein_sample', 'path': '', 'seq_len': 64, 'crop': 'start', 'pack': False}
  )
  baseline = data.unigram_baseline(cfg)
  # The most frequent residue (L in most proteomes) is right ~10% of the time.
  assert 0.05 < baseline['accuracy'] < 0.15

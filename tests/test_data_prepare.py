"""`python -m performer.data.prepare` and the fail-fast "not prepared" errors, offline.

Nothing here downloads: catalog datasets are only ever asked for in an empty data_dir
(where the pipelines must refuse before touching TFDS builders), and the network is cut
off inside the process so any attempt would show up as a recorded connection.
"""

import socket
import time

import ml_collections
import pytest

from conftest import run_script  # pylint: disable=g-bad-import-order
from performer import data
from performer.data import catalog, prepare


@pytest.fixture
def no_network(monkeypatch):
  """Every connection attempt fails at once and is recorded."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError('network disabled in tests')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)
  return attempts


def data_cfg(name, data_dir, **kw):
  cfg = ml_collections.ConfigDict(
    dict(
      name=name,
      path='',
      seq_len=64,
      crop='random',
      pack=False,
      data_dir=str(data_dir),
      vocab_size=0,
      spm_path='',
      variant='downsampled_imagenet',
    )
  )
  cfg.update(kw)
  return cfg


@pytest.mark.parametrize(
  'name,kw,command',
  [
    ('lm1b', {}, 'python -m performer.data.prepare lm1b --data_dir'),
    ('imagenet64', {'seq_len': 12288}, 'python -m performer.data.prepare imagenet64 --data_dir'),
    ('imagenet64', {'seq_len': 12288, 'variant': 'imagenet_resized'}, '--variant imagenet_resized'),
    ('uniref50', {}, 'python -m performer.data.prepare uniref50 --data_dir'),
    ('trembl', {}, 'python -m performer.data.prepare trembl --data_dir'),
  ],
)
def test_missing_dataset_fails_fast_naming_the_command(tmp_path, no_network, name, kw, command):
  cfg = data_cfg(name, tmp_path / 'empty', **kw)
  for call in (
    lambda: data.vocab_for(cfg),
    lambda: data.build_dataset(cfg, split='train', batch_size=2),
  ):
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotPreparedError) as info:
      call()
    assert (
      time.perf_counter() - start < 20.0
    )  # fast: no download, no build (generous for loaded CI)
    message = str(info.value)
    assert command in message and str(tmp_path / 'empty') in message
    assert '\n' not in message  # train.py prints it as one line
  assert no_network == []


def test_tfrecord_only_dataset_is_explained(tmp_path):
  version = tmp_path / 'lm1b' / '1.1.0'
  version.mkdir(parents=True)
  (version / 'dataset_info.json').write_text('{}')
  (version / 'lm1b-train.tfrecord-00000-of-00001').write_text('')
  with pytest.raises(data.DatasetNotPreparedError, match='only TFRecord'):
    data.build_dataset(data_cfg('lm1b', tmp_path), split='train', batch_size=2)
  assert catalog.find_prepared('lm1b', str(tmp_path), ['train']) is None
  (version / 'lm1b-train.array_record-00000-of-00001').write_text('')
  assert catalog.find_prepared('lm1b', str(tmp_path), ['train']) == str(version)
  assert catalog.find_prepared('lm1b', str(tmp_path), ['train', 'test']) is None


@pytest.mark.parametrize(
  'args',
  [
    ['lm1b'],
    ['imagenet64'],
    ['imagenet64', '--variant', 'imagenet_resized'],
    ['uniref50'],
    ['trembl'],
  ],
)
def test_dry_run_prints_disk_space(tmp_path, capsys, no_network, args):
  assert prepare.main(args + ['--data_dir', str(tmp_path), '--dry_run']) == 0
  out = capsys.readouterr().out
  assert 'needs about' in out and 'GB of disk' in out and str(tmp_path) in out
  assert no_network == []


def test_prepare_uniref50_from_a_local_fasta(tmp_path, capsys, no_network):
  fasta = tmp_path / 'uniref50.fasta'
  fasta.write_text(
    ''.join(f'>UniRef50_Q{i:04d}\nMKV{"ACDEFGHIKL"[i % 10] * (i % 7 + 3)}\n' for i in range(60))
  )
  argv = ['uniref50', '--data_dir', str(tmp_path / 'data'), '--fasta', str(fasta)]
  assert prepare.main(argv) == 0
  out = capsys.readouterr().out
  assert 'needs about' in out and 'uniref50 ready in' in out
  cfg = data_cfg('uniref50', tmp_path / 'data', seq_len=16)
  assert next(data.build_dataset(cfg, split='train', batch_size=2))['tokens'].shape == (2, 16)
  assert prepare.main(argv) == 0  # already prepared: nothing to do
  assert no_network == []


def test_catalog_prepare_without_tensorflow_says_how_to_install(tmp_path, capsys, no_network):
  if catalog.tensorflow_available():
    pytest.skip('TensorFlow is installed: this would start a real download')
  start = time.perf_counter()
  assert prepare.main(['lm1b', '--data_dir', str(tmp_path)]) == 1
  assert time.perf_counter() - start < 20.0  # fast: no download, no build (generous for loaded CI)
  err = capsys.readouterr().err
  assert 'needs TensorFlow' in err and 'performer-zoo[prepare]' in err
  assert no_network == []


def test_prepare_text_trains_the_tokenizer_next_to_the_file(tmp_path, capsys):
  corpus = tmp_path / 'notes.txt'
  corpus.write_text('\n'.join(f'line {i} says {"abc " * (i % 5)}done' for i in range(80)))
  assert prepare.main(['text', '--path', str(corpus), '--vocab_size', '300']) == 0
  assert 'text tokenizer ready' in capsys.readouterr().out
  assert (tmp_path / 'notes.txt.spm300.model').exists()


def test_train_py_fails_fast_when_lm1b_is_missing(tmp_path):
  start = time.perf_counter()
  result = run_script(
    [
      'train.py',
      '--config=configs/lm1b_transformer.py',
      f'--workdir={tmp_path / "work"}',
      f'--config.data.data_dir={tmp_path / "nothing"}',
    ],
    timeout=120,
  )
  elapsed = time.perf_counter() - start
  assert result.returncode != 0
  assert f'python -m performer.data.prepare lm1b --data_dir {tmp_path / "nothing"}' in (
    result.stderr
  )
  assert elapsed < 60  # process start and imports included; the check itself is instant


def test_bad_variant_is_one_line_and_exit_2(tmp_path, capsys, no_network):
  assert prepare.main(['imagenet64', '--variant', 'nope', '--data_dir', str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error:') and 'variant' in err and '\n' not in err

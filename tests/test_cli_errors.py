"""A file the user names that is missing or garbage: one line on stderr, exit 2, no traceback.

The project rule: every file, path or value a user names (data, checkpoints, weights,
prompts, config keys) gets ONE `error: ...` line on stderr and exit status 2. The CLI
cases fail in train.py's data check, before a model is built (a few seconds each, mostly
imports); the library cases check the `performer.errors` types directly.
"""

import gzip
import json

import pytest

from conftest import run_script
from performer import data, errors
from performer.convert import files, gguf_tokenizer
from performer.data import fasta
from performer.training import checkpoints, config_utils


def _garbage(path):
  path.write_bytes(bytes(range(256)) * 8)  # NULs, control bytes and invalid UTF-8
  return path


def _fasta_case(tmp_path, case):
  """The --config.data.path value for one kind of bad file."""
  if case == 'missing':
    return tmp_path / 'missing.fa'
  if case == 'directory':
    (tmp_path / 'a_folder.fa').mkdir()
    return tmp_path / 'a_folder.fa'
  if case == 'binary':
    return _garbage(tmp_path / 'junk.bin')
  if case == 'no_header':
    path = tmp_path / 'residues.fa'
    path.write_text('MKVLAAGIVG\n>p1\nMKV\n')
    return path
  if case == 'empty':
    path = tmp_path / 'empty.fa'
    path.write_bytes(b'')
    return path
  raise AssertionError(case)


def assert_one_line_error(proc, name):
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert lines[0].startswith('error: '), lines[0]
  assert name in lines[0], lines[0]
  return lines[0]


@pytest.mark.parametrize(
  'case, expected',
  [
    ('missing', 'not found'),
    ('directory', 'is a directory'),
    ('binary', 'binary data, not a FASTA file'),
    ('no_header', "sequence data before the first '>' header"),
    ('empty', 'no protein sequences found'),
  ],
)
def test_train_bad_fasta_file(tmp_path, case, expected):
  path = _fasta_case(tmp_path, case)
  workdir = tmp_path / 'workdir'
  proc = run_script(
    [
      'train.py',
      '--config=configs/tiny.py',
      f'--workdir={workdir}',
      '--config.data.name=fasta',
      f'--config.data.path={path}',
    ],
    timeout=120,
  )
  line = assert_one_line_error(proc, path.name)
  assert expected in line, line
  assert not workdir.exists()  # failed before anything was built or written


def test_train_missing_text_file(tmp_path):
  path = tmp_path / 'missing.txt'
  proc = run_script(
    [
      'train.py',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path / "workdir"}',
      '--config.data.name=text',
      f'--config.data.path={path}',
    ],
    timeout=120,
  )
  assert 'text file' in assert_one_line_error(proc, 'missing.txt')


@pytest.mark.slow  # ~13 s on 2 cores: the model is built before init_from is read
def test_train_bad_init_from(tmp_path):
  """Fails after the checkpoint manager is made: its background cleanup thread must not
  print a traceback at exit (checkpoints.make_manager waits for it)."""
  junk = _garbage(tmp_path / 'junk.ckpt')
  proc = run_script(
    [
      'train.py',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path / "workdir"}',
      f'--config.train.init_from={junk}',
    ],
    timeout=180,
  )
  assert 'is a file; expected a workdir' in assert_one_line_error(proc, 'junk.ckpt')


def test_eval_bad_data_file(tmp_path):
  path = _garbage(tmp_path / 'junk.fa')
  proc = run_script(
    [
      'eval.py',
      '--config=configs/tiny.py',
      f'--workdir={tmp_path}',
      '--config.data.name=fasta',
      f'--config.data.path={path}',
    ],
    timeout=120,
  )
  assert_one_line_error(proc, 'junk.fa')


def test_sample_negative_max_new_tokens(tmp_path):
  proc = run_script(['sample.py', f'--workdir={tmp_path}', '--max_new_tokens=-5'], timeout=120)
  line = assert_one_line_error(proc, '--max_new_tokens')
  assert 'must be >= 0' in line and 'prompt' not in line, line


def test_eval_help_lists_config_and_workdir():
  proc = run_script(['eval.py', '--help'], timeout=120)  # absl's --help exits with 1
  for flag in ('--config:', '--workdir:', '--text_file:', '--split:'):
    assert flag in proc.stdout, proc.stdout


def test_without_config_or_run(tmp_path):
  proc = run_script(['train.py', f'--workdir={tmp_path}', '--config.train.num_steps=3'])
  assert 'its config.json is the config' in assert_one_line_error(proc, '--config: missing')


# --- the error types ----------------------------------------------------------------


def test_user_errors_share_one_base():
  for cls in (
    errors.DataFileError,
    errors.WeightsFileError,
    config_utils.ConfigError,
    checkpoints.CheckpointError,
    checkpoints.InitFromError,
    data.DatasetNotPreparedError,
  ):
    assert issubclass(cls, errors.UserInputError) and issubclass(cls, ValueError), cls
  assert issubclass(data.DatasetNotPreparedError, FileNotFoundError)  # as before


# --- data files, in process ------------------------------------------------------------


def _cfg(**kw):
  import ml_collections  # pylint: disable=g-import-not-at-top

  return ml_collections.ConfigDict({'seq_len': 16, **kw})


@pytest.mark.parametrize('case', ['missing', 'directory', 'binary', 'no_header', 'empty'])
def test_check_files_fasta(tmp_path, case):
  path = _fasta_case(tmp_path, case)
  with pytest.raises(errors.DataFileError, match=path.name) as info:
    data.check_files(_cfg(name='fasta', path=str(path)))
  assert '\n' not in str(info.value)


def test_corrupt_gzip_fasta(tmp_path):
  bad = tmp_path / 'bad.fa.gz'
  bad.write_bytes(b'\x1f\x8b' + b'not really gzip' * 10)
  with pytest.raises(errors.DataFileError, match='bad.fa.gz: corrupt or truncated gzip'):
    list(fasta.parse_fasta(bad))
  whole = gzip.compress(b''.join(b'>p%d\nMKVLAAGIVG\n' % i for i in range(20000)))
  truncated = tmp_path / 'truncated.fa.gz'
  truncated.write_bytes(whole[: len(whole) // 2])
  with pytest.raises(errors.DataFileError, match='truncated.fa.gz: corrupt or truncated gzip'):
    list(fasta.parse_fasta(truncated))


def test_binary_data_after_a_header(tmp_path):
  path = tmp_path / 'x.fa'
  path.write_bytes(b'>p1\nMKV\nAB\x00\x01CD\n')
  with pytest.raises(
    errors.DataFileError, match=r"x\.fa:3: binary data in the sequence of record 'p1'"
  ):
    list(fasta.parse_fasta(path))


@pytest.mark.parametrize(
  'content, expected',
  [
    (b'caf\xe9\nhello\n', r'latin\.txt:1: not UTF-8 text'),
    (b'', 'no non-blank lines'),
    (b'\n  \n\n', 'no non-blank lines'),
    (b'ok\nbin\x00ary\n', r'latin\.txt:2: binary data'),
  ],
)
def test_bad_text_file(tmp_path, content, expected):
  path = tmp_path / 'latin.txt'
  path.write_bytes(content)
  with pytest.raises(errors.DataFileError, match=expected):
    data.check_files(_cfg(name='text', path=str(path)))


def test_protein_text_file_with_line_breaks():
  """eval.py --text_file on residues: the newline every editor writes is no residue."""
  from performer.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  from performer.training import text_eval  # pylint: disable=g-import-not-at-top

  vocab = vocab_lib.PROTEIN_VOCAB
  ids = text_eval.tokenize(vocab, 'MKT\nAYI\n').tolist()
  assert ids == [vocab.bos_id, *vocab.encode('MKTAYI')]


def test_missing_text_file(tmp_path):
  cfg = _cfg(name='text', path=str(tmp_path / 'nope.txt'))
  with pytest.raises(errors.DataFileError, match=r'text file .*not found: .*nope\.txt'):
    data.check_files(cfg)
  with pytest.raises(errors.UserInputError, match='config.data.path must name'):
    data.check_files(_cfg(name='text', path=''))


# --- weights, GGUF and tokenizer files ------------------------------------------------


def test_check_gguf_file(tmp_path):
  with pytest.raises(errors.WeightsFileError, match=r'GGUF file not found: .*missing\.gguf'):
    files.check_gguf_file(tmp_path / 'missing.gguf')
  with pytest.raises(errors.WeightsFileError, match='is a directory'):
    files.check_gguf_file(tmp_path)
  junk = _garbage(tmp_path / 'junk.gguf')
  with pytest.raises(errors.WeightsFileError, match=r'junk\.gguf is not a GGUF file;'):
    files.check_gguf_file(junk)
  header = json.dumps({'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}}).encode()
  st = tmp_path / 'model.safetensors'
  st.write_bytes(len(header).to_bytes(8, 'little') + header + b'\0' * 8)
  with pytest.raises(errors.WeightsFileError, match='not a GGUF file.*it is safetensors'):
    files.check_gguf_file(st)
  good = tmp_path / 'ok.gguf'
  good.write_bytes(b'GGUF' + b'\0' * 60)
  assert files.check_gguf_file(good) == str(good)
  with pytest.raises(errors.WeightsFileError, match=r'ok\.gguf: corrupt or truncated GGUF'):
    files.open_gguf(good)


def test_read_safetensors_missing_and_garbage(tmp_path):
  with pytest.raises(errors.WeightsFileError, match=r'no such checkpoint: .*nope\.safetensors'):
    files.read_safetensors(str(tmp_path / 'nope.safetensors'))
  with pytest.raises(errors.WeightsFileError, match='neither model.safetensors'):
    files.read_safetensors(str(tmp_path))
  junk = _garbage(tmp_path / 'junk.safetensors')
  with pytest.raises(errors.WeightsFileError, match=r'junk\.safetensors is not a safetensors'):
    files.read_safetensors(str(junk))
  # Passes the header sniff (length, then '{') but is not JSON.
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes((12).to_bytes(8, 'little') + b'{not json!!}')
  with pytest.raises(
    errors.WeightsFileError, match=r'bad\.safetensors: corrupt safetensors header'
  ):
    files.read_safetensors(str(bad))
  header = json.dumps({'w': {'dtype': 'F32', 'shape': 'oops'}}).encode()
  malformed = tmp_path / 'malformed.safetensors'
  malformed.write_bytes(len(header).to_bytes(8, 'little') + header)
  with pytest.raises(errors.WeightsFileError, match="tensor 'w' has a malformed header entry"):
    files.read_safetensors(str(malformed))


def test_sharded_index_errors(tmp_path):
  index = tmp_path / 'model.safetensors.index.json'
  index.write_text('{"weight_map": ')
  with pytest.raises(errors.WeightsFileError, match='safetensors index .* is not valid JSON'):
    files.read_safetensors(str(tmp_path))
  index.write_text(json.dumps({'weight_map': {'w': 'model-00001.safetensors'}}))
  with pytest.raises(errors.WeightsFileError, match='checkpoint shard missing: .*model-00001'):
    files.read_safetensors(str(tmp_path))


def test_read_json(tmp_path):
  with pytest.raises(errors.WeightsFileError, match='Llama config not found'):
    files.read_json(str(tmp_path / 'config.json'), 'Llama config')
  bad = _garbage(tmp_path / 'config.json')
  with pytest.raises(errors.WeightsFileError, match='Llama config .* is not valid JSON'):
    files.read_json(str(bad), 'Llama config')
  bad.write_text('[1, 2]')
  with pytest.raises(errors.WeightsFileError, match='is not a JSON object'):
    files.read_json(str(bad), 'Llama config')


def test_load_tokenizer_json(tmp_path):
  with pytest.raises(errors.WeightsFileError, match=r'tokenizer not found: .*tokenizer\.json'):
    files.load_tokenizer_json(tmp_path / 'tokenizer.json')
  with pytest.raises(errors.WeightsFileError, match='is a directory'):
    files.load_tokenizer_json(tmp_path)
  junk = _garbage(tmp_path / 'tokenizer.json')
  with pytest.raises(errors.WeightsFileError, match='is not a tokenizers JSON file'):
    files.load_tokenizer_json(junk)
  with pytest.raises(errors.WeightsFileError, match='is not a tokenizers JSON file'):
    gguf_tokenizer.load_tokenizer_file(str(junk))
  from tokenizers import Tokenizer, models  # pylint: disable=g-import-not-at-top

  good = tmp_path / 'good.json'
  Tokenizer(models.BPE(vocab={'a': 0, 'b': 1, 'ab': 2}, merges=[('a', 'b')])).save(str(good))
  assert files.load_tokenizer_json(good).encode('ab').ids == [2]

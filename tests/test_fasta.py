"""Edge cases of the FASTA reader, each on a tiny fixture written to tmp_path."""

import gzip

import pytest

from performer import errors
from performer.data import fasta


def write(tmp_path, text, name='x.fa', newline='\n'):
  path = tmp_path / name
  path.write_bytes(text.replace('\n', newline).encode('utf-8'))
  return path


def parse(path, **kw):
  return list(fasta.parse_fasta(path, **kw))


def test_basic_records_multiline_and_description(tmp_path):
  path = write(tmp_path, '>p1 first protein\nMKV\nLLA\n\n>p2\nAC\n; a comment line\nDE\n')
  assert parse(path) == [('p1', 'first protein', 'MKVLLA'), ('p2', '', 'ACDE')]


def test_windows_line_endings(tmp_path):
  path = write(tmp_path, '>p1 desc\nMKV\nLL*\n>p2\nAC\n', newline='\r\n')
  assert parse(path) == [('p1', 'desc', 'MKVLL'), ('p2', '', 'AC')]


def test_sequence_before_header_names_file_and_line(tmp_path):
  path = write(tmp_path, '\nMKV\n>p1\nAC\n')
  with pytest.raises(ValueError, match=r"x\.fa:2: sequence data before the first '>'"):
    parse(path)


@pytest.mark.parametrize('header', ['>', '>   '])
def test_empty_header_id_is_an_error_with_line(tmp_path, header):
  path = write(tmp_path, f'>p1\nAC\n{header}\nDE\n')
  with pytest.raises(ValueError, match=r'x\.fa:3: FASTA header has an empty record id'):
    parse(path)


def test_empty_sequences_skipped_and_counted_with_warning(tmp_path):
  path = write(tmp_path, '>e1\n>p1\nAC\n>e2\n\n>e3\n*\n')
  stats = fasta.FastaStats()
  with pytest.warns(UserWarning, match='skipped 3 FASTA record'):
    records = parse(path, stats=stats)
  assert records == [('p1', '', 'AC')]
  assert (stats.records, stats.empty_skipped) == (1, 3)


def test_empty_sequences_rejected_when_asked(tmp_path):
  path = write(tmp_path, '>p1\nAC\n>e1\n>p2\nDE\n')
  with pytest.raises(ValueError, match=r"x\.fa:3: record 'e1' has an empty sequence"):
    parse(path, on_empty='error')
  with pytest.raises(ValueError, match='on_empty'):
    parse(path, on_empty='ignore')


def test_nonstandard_letters_lowercase_and_stop(tmp_path):
  path = write(tmp_path, '>p1\nmkJv\nBOUZx*\n')
  stats = fasta.FastaStats()
  assert parse(path, stats=stats) == [('p1', '', 'MKXVBOUZX')]
  assert stats.mapped_to_x == 1 and stats.stops_stripped == 1 and stats.residues == 9


@pytest.mark.parametrize('line', ['MK1V', 'MK-V', 'MK V', 'MK.V', 'MK\tV', 'MKé'])
def test_digits_punctuation_whitespace_are_errors_naming_the_line(tmp_path, line):
  path = write(tmp_path, f'>p1\nAAA\n{line}\n')
  with pytest.raises(ValueError, match=r"x\.fa:3: invalid character .* record 'p1'"):
    parse(path)


def test_inner_stop_is_an_error(tmp_path):
  with pytest.raises(ValueError, match=r"x\.fa:2: '\*' inside the sequence"):
    parse(write(tmp_path, '>p1\nMK*V\n'))
  # A '*' ending one line but followed by more residues: the error names its line.
  with pytest.raises(ValueError, match=r"y\.fa:2: '\*' inside the sequence"):
    parse(write(tmp_path, '>p1\nMK*\nVV\n', name='y.fa'))


def test_over_long_sequences_are_not_cropped_by_the_parser(tmp_path):
  seq = 'ACDEFGHIKLMNPQRSTVWY' * 500
  path = write(tmp_path, '>long\n' + '\n'.join(seq[i : i + 60] for i in range(0, len(seq), 60)))
  assert parse(path) == [('long', '', seq)]


@pytest.mark.parametrize('name', ['x.fa.gz', 'x_without_suffix'])
def test_gzip_is_transparent(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(gzip.compress(b'>p1 d\r\nMKV\r\n>p2\nAC*\n'))
  assert parse(path) == [('p1', 'd', 'MKV'), ('p2', '', 'AC')]


def test_missing_file(tmp_path):
  missing = tmp_path / 'nope.fa'
  with pytest.raises(errors.DataFileError, match='FASTA file not found: .*nope.fa'):
    parse(missing)


def test_empty_file_yields_nothing(tmp_path):
  assert parse(write(tmp_path, '')) == []

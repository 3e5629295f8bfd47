"""A streaming FASTA reader for protein files, strict about malformed input.

Why not Biopython: one less dependency, and we want errors that name the file
and line (a user's FASTA that silently parses into garbage trains a useless
model). Behaviour, each covered by tests/test_fasta.py:

* ``>id description`` starts a record; the id is the first word after ``>``.
  A header with no id at all is an error. Lines starting with ``;`` (old
  FASTA comments) and blank lines are ignored.
* Sequence data before the first header is an error (usually a wrong file).
* Residues are normalised by the vocabulary's rules (``vocab.py``): lowercase
  is upper-cased, one final ``*`` stop is stripped, unknown letters become X;
  digits, punctuation, inner whitespace or a ``*`` before the end are errors.
* Empty records are skipped and counted (one warning per file), or rejected
  with ``on_empty='error'``.
* Over-long sequences are returned whole: cropping is the pipeline's job.
* gzip input is detected from its magic bytes, whatever the file name.
  Windows (CRLF) line endings are accepted.
* Every problem with the file (missing, a directory, unreadable, binary,
  corrupt gzip, malformed records) is an ``errors.DataFileError`` (a
  ValueError) whose one-line message names the file, and the line where known.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import warnings
import zlib
from typing import BinaryIO, Iterator

from performer import errors
from performer.data import vocab as vocab_lib

_GZIP_MAGIC = b'\x1f\x8b'
_ALPHABET_BYTES = vocab_lib.ALPHABET.encode('ascii')
_UPPER = bytes.maketrans(b'abcdefghijklmnopqrstuvwxyz', b'ABCDEFGHIJKLMNOPQRSTUVWXYZ')
# Control bytes (all but tab) never appear in a text file; their presence means binary data.
_TEXT_CONTROLS = bytes(b for b in range(32) if b != 9) + b'\x7f'
_EXPECTED = "expected FASTA text: '>' header lines, each followed by residue lines"


@dataclasses.dataclass
class FastaStats:
  """Counts filled in while parsing, so callers can report what was cleaned up."""

  records: int = 0
  residues: int = 0
  empty_skipped: int = 0
  stops_stripped: int = 0
  mapped_to_x: int = 0  # letters outside the 25-letter alphabet (e.g. J)


def open_fasta(path: str | os.PathLike) -> BinaryIO:
  """Opens a plain or gzip-compressed file for binary line reading.

  A missing path, a directory or an unreadable file is a DataFileError.
  """
  path = os.fspath(path)
  errors.require_file(path, 'FASTA file', errors.DataFileError)
  try:
    with open(path, 'rb') as f:
      magic = f.read(2)
    if magic == _GZIP_MAGIC:
      # BufferedReader makes line iteration over gzip several times faster.
      return io.BufferedReader(gzip.open(path, 'rb'))
    return open(path, 'rb')
  except OSError as e:
    raise errors.DataFileError(f'cannot read FASTA file {path!r}: {errors.os_error_text(e)}') from e


def _read_lines(f: BinaryIO, name: str) -> Iterator[bytes]:
  """The lines of an open FASTA file; read errors (a corrupt or truncated gzip
  stream, an I/O error) become a DataFileError naming the file."""
  lineno = 0
  try:
    for lineno, raw in enumerate(f, 1):
      yield raw
  except (OSError, EOFError, zlib.error) as e:
    gzipped = isinstance(getattr(f, 'raw', None), gzip.GzipFile)
    what = 'corrupt or truncated gzip data' if gzipped else 'read error'
    where = f' after line {lineno}' if lineno else ''
    raise errors.DataFileError(
      f'{name}: {what}{where} ({type(e).__name__}: {" ".join(str(e).split())}); '
      'expected a FASTA file, plain or gzip-compressed'
    ) from e


def _is_binary(line: bytes) -> bool:
  """True for bytes no text file has: NUL or other control bytes (tab excepted)."""
  return len(line.translate(None, _TEXT_CONTROLS)) != len(line)


def _is_utf8(line: bytes) -> bool:
  try:
    line.decode('utf-8')
  except UnicodeDecodeError:
    return False
  return True


def parse_fasta(
  path: str | os.PathLike, *, on_empty: str = 'skip', stats: FastaStats | None = None
) -> Iterator[tuple[str, str, str]]:
  """Yields (record_id, description, sequence) for each record of a FASTA file.

  Args:
    path: a FASTA file, optionally gzip-compressed.
    on_empty: 'skip' (count in ``stats.empty_skipped`` and warn once) or 'error'.
    stats: optional FastaStats, updated in place as records are read.
  """
  if on_empty not in ('skip', 'error'):
    raise ValueError(f"on_empty must be 'skip' or 'error', got {on_empty!r}")
  stats = stats if stats is not None else FastaStats()
  name = os.fspath(path)
  header = None  # (record_id, description, line number)
  chunks: list[bytes] = []
  star_line = 0  # line holding a '*' that must stay the record's last residue

  def finish():
    record_id, description, header_line = header
    seq = b''.join(chunks)
    if star_line:
      stats.stops_stripped += 1
    if not seq:
      if on_empty == 'error':
        raise errors.DataFileError(
          f'{name}:{header_line}: record {record_id!r} has an empty sequence'
        )
      stats.empty_skipped += 1
      return None
    stats.records += 1
    stats.residues += len(seq)
    stats.mapped_to_x += len(seq.translate(_UPPER).translate(None, _ALPHABET_BYTES))
    return record_id, description, seq.translate(vocab_lib.NORMALIZE_TABLE).decode('ascii')

  with open_fasta(path) as f:
    for lineno, raw in enumerate(_read_lines(f, name), 1):
      line = raw.strip()  # also drops '\r' of Windows line endings
      if not line or line.startswith(b';'):
        continue
      if line.startswith(b'>'):
        if header is not None and (record := finish()) is not None:
          yield record
        text = line[1:].decode('utf-8', errors='replace').strip()
        if not text:
          raise errors.DataFileError(f'{name}:{lineno}: FASTA header has an empty record id')
        parts = text.split(None, 1)
        header = (parts[0], parts[1] if len(parts) > 1 else '', lineno)
        chunks, star_line = [], 0
        continue
      if header is None:
        if _is_binary(line) or not _is_utf8(line):
          raise errors.DataFileError(f'{name}:{lineno}: binary data, not a FASTA file; {_EXPECTED}')
        raise errors.DataFileError(
          f"{name}:{lineno}: sequence data before the first '>' header "
          f'(is this a FASTA file?): {_preview(line)!r}; {_EXPECTED}'
        )
      bad = vocab_lib.find_invalid(line)
      if bad:
        if _is_binary(line):
          raise errors.DataFileError(
            f'{name}:{lineno}: binary data in the sequence of record {header[0]!r}, '
            f'not a FASTA file; {_EXPECTED}'
          )
        raise errors.DataFileError(
          f'{name}:{lineno}: invalid character {_char(bad)!r} in the sequence of '
          f"record {header[0]!r}; only letters and a final '*' are allowed"
        )
      if star_line or (b'*' in line and line.index(b'*') != len(line) - 1):
        raise errors.DataFileError(
          f"{name}:{star_line or lineno}: '*' inside the sequence of record "
          f"{header[0]!r}; only a final stop '*' is allowed"
        )
      if line.endswith(b'*'):
        star_line, line = lineno, line[:-1]
      chunks.append(line)
    if header is not None and (record := finish()) is not None:
      yield record
  if stats.empty_skipped:
    warnings.warn(
      f'{name}: skipped {stats.empty_skipped} FASTA record(s) with an empty sequence', stacklevel=2
    )


def _char(bad: bytes) -> str:
  return bad[:1].decode('latin-1')


def _preview(line: bytes, n: int = 40) -> str:
  text = line.decode('utf-8', errors='replace')
  return text if len(text) <= n else text[:n] + '...'

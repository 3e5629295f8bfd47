"""The protein vocabulary: 4 special tokens, 20 standard amino acids, 5 ambiguous ones.

Ids are fixed by position so checkpoints stay compatible across versions:

    0 PAD   1 BOS   2 EOS   3 MASK
    4..23   A C D E F G H I K L M N P Q R S T V W Y   (the 20 standard residues)
    24..28  B O U X Z                                  (ambiguous / non-standard)

Normalisation rules (the same ones the FASTA parser applies, so a sequence typed
by a user and one read from a file encode identically):

* lowercase letters are upper-cased;
* one trailing ``*`` (a translated stop codon) is stripped;
* any other letter outside the 25-letter alphabet (``J``, ...) maps to ``X``,
  the IUPAC "unknown residue", rather than being dropped (which would shift
  positions) or rejected (real files contain them);
* anything else (digits, punctuation, whitespace, ``-`` gaps, a ``*`` that is
  not at the end) is an error: it means the input is not a plain protein
  sequence, and guessing would silently corrupt training data.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

SPECIALS = ('<pad>', '<bos>', '<eos>', '<mask>')
STANDARD = 'ACDEFGHIKLMNPQRSTVWY'
AMBIGUOUS = 'BOUXZ'
ALPHABET = STANDARD + AMBIGUOUS
UNKNOWN = 'X'

_LETTERS = b'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'


def _build_tables():
  """Byte tables: normalise any letter to an alphabet letter; bytes -> id."""
  to_upper_known = bytearray(range(256))
  for b in _LETTERS:
    up = chr(b).upper()
    to_upper_known[b] = ord(up if up in ALPHABET else UNKNOWN)
  byte_to_id = np.full(256, -1, dtype=np.int16)
  for i, ch in enumerate(ALPHABET):
    byte_to_id[ord(ch)] = len(SPECIALS) + i
  return bytes(to_upper_known), byte_to_id


# NORMALIZE_TABLE maps a-z/A-Z to the alphabet (unknown letters -> X) and leaves
# other bytes alone; BYTE_TO_ID maps alphabet bytes to ids and others to -1.
NORMALIZE_TABLE, BYTE_TO_ID = _build_tables()
# Bytes allowed in a sequence line: letters plus '*' (validated separately).
SEQUENCE_BYTES = _LETTERS + b'*'


def find_invalid(line: bytes) -> bytes:
  """Returns the bytes of `line` that may never appear in a sequence (b'' if none)."""
  return line.translate(None, SEQUENCE_BYTES)


class ProteinVocab:
  """Token ids for protein sequences; see the module docstring for the rules."""

  pad_id = 0
  bos_id = 1
  eos_id = 2
  mask_id = 3
  num_special = len(SPECIALS)
  size = len(SPECIALS) + len(ALPHABET)  # 29
  tokens = SPECIALS + tuple(ALPHABET)
  unknown_id = len(SPECIALS) + ALPHABET.index(UNKNOWN)

  def normalize(self, seq: str) -> str:
    """Applies the module's rules to one sequence; ValueError on bad characters."""
    if isinstance(seq, str):
      if not seq.isascii():
        pos = next(i for i, c in enumerate(seq) if not c.isascii())
        raise ValueError(
          f'invalid character {seq[pos]!r} at position {pos} of protein '
          f"sequence {seq[:30]!r}: only letters and one trailing '*' are allowed"
        )
      seq = seq.encode('ascii')
    raw = bytes(seq)
    if raw.endswith(b'*'):
      raw = raw[:-1]
    bad = find_invalid(raw)
    if bad:
      pos = next(i for i, b in enumerate(raw) if b in bad)
      raise ValueError(
        f'invalid character {chr(raw[pos])!r} at position {pos} of protein sequence '
        f"{_preview(raw)!r}: only letters and one trailing '*' are allowed"
      )
    return raw.translate(NORMALIZE_TABLE).decode('ascii')

  def encode_array(self, seq: str | bytes) -> np.ndarray:
    """Residue ids (no BOS/EOS) as uint8: compact storage for large in-memory corpora."""
    norm = self.normalize(seq)
    return BYTE_TO_ID[np.frombuffer(norm.encode('ascii'), dtype=np.uint8)].astype(np.uint8)

  def encode(self, seq: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Residue ids; BOS/EOS are optional because the data pipeline adds them itself."""
    ids = self.encode_array(seq).tolist()
    return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

  def decode(self, ids: Iterable[int], *, show_special: bool = False) -> str:
    """Residue string. Special tokens are dropped, or shown as '<pad>', '<bos>',
    '<eos>', '<mask>' with show_special=True. Out-of-range ids are a ValueError."""
    out = []
    for i in (
      np.asarray(ids if hasattr(ids, 'shape') else list(ids), dtype=np.int64).ravel().tolist()
    ):
      if not 0 <= i < self.size:
        raise ValueError(f'token id {i} is outside the protein vocabulary [0, {self.size})')
      if i >= self.num_special or show_special:
        out.append(self.tokens[i])
    return ''.join(out)

  def __repr__(self):
    return f'ProteinVocab(size={self.size})'


def _preview(raw: bytes, n: int = 30) -> str:
  text = raw.decode('ascii', errors='replace')
  return text if len(text) <= n else text[:n] + '...'


PROTEIN_VOCAB = ProteinVocab()

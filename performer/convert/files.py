"""Reading checkpoint files, with clear errors for the wrong kind of file.

A pickle, a GGUF or a truncated download handed to a safetensors reader
otherwise fails deep inside Rust with a message that does not name the
file; here every failure with a file the user named (missing, a directory,
unreadable, the wrong format, corrupt) is an ``errors.WeightsFileError`` (a
ValueError) whose one-line message names the path and what was expected.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from performer import errors
from performer.errors import WeightsFileError

GGUF_MAGIC = b'GGUF'


def is_safetensors(path: str) -> bool:
  """Header check: u64 little-endian header length, then a JSON object."""
  try:
    with open(path, 'rb') as f:
      head = f.read(9)
      size = os.fstat(f.fileno()).st_size
  except OSError:
    return False
  if len(head) < 9:
    return False
  (n,) = struct.unpack('<Q', head[:8])
  return head[8:9] == b'{' and 8 + n <= size


def is_gguf(path: str) -> bool:
  try:
    with open(path, 'rb') as f:
      return f.read(4) == GGUF_MAGIC
  except OSError:
    return False


def check_gguf_file(path: str | os.PathLike) -> str:
  """`path` (as a str) if it is a readable GGUF file, else a WeightsFileError that says
  whether it is missing, a directory, or another kind of file (safetensors gets a hint)."""
  path = os.fspath(path)
  errors.require_file(path, 'GGUF file', WeightsFileError)
  if not is_gguf(path):
    hint = ' (it is safetensors: use import_llama_safetensors)' if is_safetensors(path) else ''
    raise WeightsFileError(f"{path} is not a GGUF file{hint}; expected the 'GGUF' magic bytes")
  return path


def open_gguf(path: str | os.PathLike):
  """A `gguf.GGUFReader` over a checked GGUF file; a truncated or corrupt file is a
  WeightsFileError naming it (the reader's own errors do not)."""
  path = check_gguf_file(path)
  import gguf  # pylint: disable=g-import-not-at-top

  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  (struct, numpy, index errors)
    raise WeightsFileError(
      f'{path}: corrupt or truncated GGUF file ({type(e).__name__}: {_one_line(e)})'
    ) from e


def _one_line(e: BaseException, limit: int = 200) -> str:
  text = ' '.join(str(e).split())
  return text if len(text) <= limit else text[:limit] + '...'


def safetensors_files(path_or_dir: str) -> list[str]:
  """The safetensors file(s) of a checkpoint: a file, a directory holding
  `model.safetensors`, or a directory with a sharded
  `model.safetensors.index.json`."""
  path = os.fspath(path_or_dir)
  if os.path.isdir(path):
    index = os.path.join(path, 'model.safetensors.index.json')
    single = os.path.join(path, 'model.safetensors')
    if os.path.exists(single):
      files = [single]
    elif os.path.exists(index):
      weight_map = read_json(index, 'safetensors index').get('weight_map')
      if not isinstance(weight_map, dict) or not all(
        isinstance(s, str) for s in weight_map.values()
      ):
        raise WeightsFileError(
          f"safetensors index {index} has no 'weight_map' of tensor name -> shard file"
        )
      files = [os.path.join(path, s) for s in sorted(set(weight_map.values()))]
    else:
      raise WeightsFileError(
        f'{path} has neither model.safetensors nor model.safetensors.index.json'
      )
  elif os.path.exists(path):
    files = [path]
  else:
    raise WeightsFileError(f'no such checkpoint: {path}')
  for f in files:
    if not os.path.exists(f):
      raise WeightsFileError(f'checkpoint shard missing: {f}')
    if os.path.isdir(f):
      raise WeightsFileError(f'checkpoint shard {f} is a directory; expected a safetensors file')
    if not os.access(f, os.R_OK):
      raise WeightsFileError(f'cannot read checkpoint file {f}: permission denied')
    if not is_safetensors(f):
      kind = 'a GGUF file' if is_gguf(f) else 'not a safetensors file'
      raise WeightsFileError(f'{f} is {kind}; expected HF safetensors weights')
  return files


_ST_DTYPES = {
  'F64': np.float64,
  'F32': np.float32,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'I64': np.int64,
  'I32': np.int32,
  'I16': np.int16,
  'I8': np.int8,
  'U8': np.uint8,
  'BOOL': np.bool_,
}


def _read_one(path: str) -> dict[str, np.ndarray]:
  """Parse one safetensors file with numpy (memory-mapped).

  The format is an 8-byte header length, a JSON header of
  {name: {dtype, shape, data_offsets}} and a flat byte buffer. Reading it
  directly keeps bf16 checkpoints working without torch and lets every
  inconsistency be reported with the file and tensor name.
  """
  try:
    with open(path, 'rb') as f:
      (n,) = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(n))
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WeightsFileError(f'{path}: corrupt safetensors header ({_one_line(e)})') from e
  if not isinstance(header, dict):
    raise WeightsFileError(f'{path}: corrupt safetensors header (not a JSON object)')
  size = os.path.getsize(path) - 8 - n
  buf = (
    np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n) if size > 0 else np.zeros(0, np.uint8)
  )
  out = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    try:
      dtype = _ST_DTYPES.get(info.get('dtype'))
      start, stop = (int(x) for x in info['data_offsets'])
      shape = tuple(int(d) for d in info['shape'])
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise WeightsFileError(
        f'{path}: tensor {key!r} has a malformed header entry {info!r:.200} ({_one_line(e)})'
      ) from e
    if dtype is None:
      raise WeightsFileError(f'{path}: tensor {key!r} has unsupported dtype {info.get("dtype")!r}')
    if (
      not 0 <= start <= stop
      or stop > buf.size
      or (stop - start) != np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
    ):
      raise WeightsFileError(
        f'{path}: tensor {key!r} has inconsistent byte range '
        f'{start}:{stop} for {info["dtype"]} {list(shape)}'
      )
    out[key] = np.frombuffer(buf[start:stop], dtype=dtype).reshape(shape)
  return out


def read_safetensors(path_or_dir: str) -> dict[str, np.ndarray]:
  """All tensors of a (possibly sharded) safetensors checkpoint as numpy.

  Floating tensors are widened to float32 here: our parameters are float32,
  so this is the one place precision is decided.
  """
  out = {}
  for path in safetensors_files(path_or_dir):
    for key, arr in _read_one(path).items():
      if key in out:
        raise WeightsFileError(f'tensor {key!r} appears in two shards (the second: {path})')
      floating = arr.dtype.kind == 'f' or arr.dtype == ml_dtypes.bfloat16
      out[key] = arr.astype(np.float32) if floating else np.array(arr)
  return out


def read_json(path: str, what: str) -> dict:
  """A JSON object file (config.json, ...); `what` names it in the WeightsFileError
  for a missing, unreadable or non-JSON file."""
  if not os.path.exists(path):
    raise WeightsFileError(f'{what} not found: {path}')
  errors.require_file(path, what, WeightsFileError)
  try:
    with open(path, encoding='utf-8') as f:
      out = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise WeightsFileError(f'{what} {path} is not valid JSON: {_one_line(e)}') from e
  except OSError as e:
    raise WeightsFileError(f'cannot read {what} {path}: {errors.os_error_text(e)}') from e
  if not isinstance(out, dict):
    raise WeightsFileError(f'{what} {path} is not a JSON object')
  return out


def load_tokenizer_json(path: str | os.PathLike):
  """A `tokenizers.Tokenizer` from a tokenizer.json file; a WeightsFileError naming the
  file if it is missing, a directory, unreadable or not a tokenizers JSON file."""
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  if not os.path.exists(path):
    raise WeightsFileError(f'tokenizer not found: {path}')
  errors.require_file(path, 'tokenizer file', WeightsFileError)
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception  # pylint: disable=broad-except
    raise WeightsFileError(f'{path} is not a tokenizers JSON file: {_one_line(e)}') from e


def checkpoint_dir(path_or_dir: str) -> str:
  """Directory that holds config.json / tokenizer.json next to the weights."""
  path = os.fspath(path_or_dir)
  return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))

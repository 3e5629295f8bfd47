"""Reading checkpoint files, with clear errors for the wrong kind of file.

A pickle, a GGUF or a truncated download handed to a safetensors reader
otherwise fails deep inside Rust with a message that does not name the
file; here every failure is a ValueError (or FileNotFoundError) naming the
path and what was expected.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

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
      with open(index) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      files = [os.path.join(path, s) for s in shards]
    else:
      raise FileNotFoundError(
        f'{path} has neither model.safetensors nor model.safetensors.index.json'
      )
  elif os.path.exists(path):
    files = [path]
  else:
    raise FileNotFoundError(f'no such checkpoint: {path}')
  for f in files:
    if not os.path.exists(f):
      raise FileNotFoundError(f'checkpoint shard missing: {f}')
    if not is_safetensors(f):
      kind = 'a GGUF file' if is_gguf(f) else 'not a safetensors file'
      raise ValueError(f'{f} is {kind}; expected HF safetensors weights')
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
  with open(path, 'rb') as f:
    (n,) = struct.unpack('<Q', f.read(8))
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{path}: corrupt safetensors header ({e})') from e
  buf = np.memmap(path, dtype=np.uint8, mode='r', offset=8 + n)
  out = {}
  for key, info in header.items():
    if key == '__metadata__':
      continue
    dtype = _ST_DTYPES.get(info.get('dtype'))
    if dtype is None:
      raise ValueError(f'{path}: tensor {key!r} has unsupported dtype {info.get("dtype")!r}')
    start, stop = info['data_offsets']
    shape = tuple(info['shape'])
    if stop > buf.size or (stop - start) != np.dtype(dtype).itemsize * int(
      np.prod(shape, dtype=np.int64)
    ):
      raise ValueError(
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
        raise ValueError(f'tensor {key!r} appears in two shards')
      floating = arr.dtype.kind == 'f' or arr.dtype == ml_dtypes.bfloat16
      out[key] = arr.astype(np.float32) if floating else np.array(arr)
  return out


def read_json(path: str, what: str) -> dict:
  if not os.path.exists(path):
    raise FileNotFoundError(f'{what} not found: {path}')
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{what} {path} is not valid JSON: {e}') from e


def checkpoint_dir(path_or_dir: str) -> str:
  """Directory that holds config.json / tokenizer.json next to the weights."""
  path = os.fspath(path_or_dir)
  return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))

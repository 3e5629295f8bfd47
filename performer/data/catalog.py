"""Where prepared datasets live, whether they are there, and how to read them.

Why this module exists: asking TFDS for a dataset that is not on disk makes it
try the network (GCS lookups, downloads), and with no network TFDS retries for
minutes before failing. Training must instead fail in seconds with a message
that says how to prepare the data. So every pipeline first looks for the
prepared ArrayRecord files under ``data_dir`` with plain file-system calls
(:func:`require_prepared`) and only then opens them with
``tfds.data_source(..., download=False, try_gcs=False)``, which reads local
files only and needs no TensorFlow.

Splits. The pipelines serve 'train', 'validation' and 'test'. Catalog datasets
that ship only two splits get a validation split held out from the end of
their training split (:func:`split_source`): it is disjoint from the training
examples and fixed, because ArrayRecord order is fixed at preparation time.

:class:`Prepared` is the dataset protocol for such data: a TFDS-backed dataset
module defines its :class:`Spec` and what a record's tokens are, and inherits the
"is it prepared?" check, the split sources and its disk estimate.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Sequence

from performer import errors
from performer.data.dataset import SPLITS, Dataset, check_split

# Held-out validation examples taken from the end of a catalog training split.
HOLDOUT = 10_000
PREPARE_CMD = 'python -m performer.data.prepare'


@dataclasses.dataclass(frozen=True)
class Spec:
  """What `prepare` needs to know about one dataset (sizes are estimates, in GB)."""

  name: str  # TFDS builder name, e.g. 'downsampled_imagenet/64x64'
  splits: tuple[str, ...]  # the splits the prepared dataset must have
  download_gb: float
  prepared_gb: float
  scratch_gb: float = 0.0  # temporary extraction space during preparation
  needs_tensorflow: bool = False
  note: str = ''

  @property
  def builder_name(self) -> str:
    return self.name.split('/')[0]

  @property
  def total_gb(self) -> float:
    return self.download_gb + self.prepared_gb + self.scratch_gb


class DatasetNotPreparedError(errors.DataFileError, FileNotFoundError):
  """The dataset is not on disk; the message names the command that prepares it.

  A DataFileError (the CLIs print it as one line, exit 2), and still a
  FileNotFoundError for callers that catch that.
  """


def data_dir_for(cfg) -> str:
  """config.data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets (TFDS's default)."""
  path = (getattr(cfg, 'data_dir', '') or '') if cfg is not None else ''
  path = path or os.environ.get('TFDS_DATA_DIR', '') or '~/tensorflow_datasets'
  return os.path.abspath(os.path.expanduser(path)) if '://' not in path else path


def _version_key(name: str) -> tuple[int, ...]:
  return tuple(int(p) for p in name.split('.'))


def find_prepared(tfds_name: str, data_dir: str, splits: Sequence[str]) -> str | None:
  """The newest ``data_dir/<tfds_name>/<version>`` with ArrayRecord files for every split.

  Plain file-system calls only: safe and fast with no network.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top  (no TF, handles gs://)

  root = epath.Path(data_dir) / tfds_name
  if not root.exists():
    return None
  versions = sorted(
    (p for p in root.iterdir() if re.fullmatch(r'\d+\.\d+\.\d+', p.name)),
    key=lambda p: _version_key(p.name),
    reverse=True,
  )
  builder = tfds_name.split('/')[0]
  for path in versions:
    if not (path / 'dataset_info.json').exists():
      continue
    if all(any(path.glob(f'{builder}-{s}.array_record-*')) for s in splits):
      return os.fspath(path)
  return None


def _tfrecord_only(tfds_name: str, data_dir: str) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top

  root = epath.Path(data_dir) / tfds_name
  return root.exists() and any(root.glob('*/*.tfrecord-*'))


def prepare_hint(dataset: str, data_dir: str, extra: str = '') -> str:
  return f'{PREPARE_CMD} {dataset} --data_dir {data_dir}{extra}'


def require_prepared(dataset: str, spec: Spec, data_dir: str, extra_args: str = '') -> str:
  """Returns the prepared version directory, or raises DatasetNotPreparedError in well
  under a second, naming the exact `prepare` command and the disk space it needs."""
  tfds_name, splits = spec.name, spec.splits
  found = find_prepared(tfds_name, data_dir, splits)
  if found is not None:
    return found
  why = (
    f'found only TFRecord files under {data_dir}/{tfds_name}; the pipelines read ArrayRecord'
    if _tfrecord_only(tfds_name, data_dir)
    else f'no ArrayRecord files for splits {", ".join(splits)} under '
    f'{data_dir}/{tfds_name}/<version>/'
  )
  size = f' (needs about {spec.total_gb:.0f} GB of disk)'
  tf_note = (
    "; it needs TensorFlow to prepare: pip install 'performer-zoo[prepare]'"
    if spec.needs_tensorflow
    else ''
  )
  raise DatasetNotPreparedError(
    f'dataset {dataset!r} (TFDS {tfds_name!r}) is not prepared: {why}. Prepare it once '
    f'with: {prepare_hint(dataset, data_dir, extra_args)}{size}{tf_note}. Or set '
    f'config.data.data_dir to where it was prepared.'
  )


class _Slice:
  """A contiguous range of a random-access source (grain needs only len and getitem)."""

  def __init__(self, source, start: int, stop: int):
    self._source, self._start, self._len = source, start, max(0, stop - start)

  def __len__(self):
    return self._len

  def __getitem__(self, index):
    index = int(index)
    if not -self._len <= index < self._len:
      raise IndexError(f'index {index} out of range for {self._len} examples')
    return self._source[self._start + index % self._len]

  def __repr__(self):
    return f'_Slice({self._source!r}, {self._start}, {self._start + self._len})'


def holdout_size(num_train: int) -> int:
  """Examples held out for validation: HOLDOUT, but at most a tenth of a small split."""
  return max(1, min(HOLDOUT, num_train // 10))


def open_source(spec: Spec, split: str, data_dir: str):
  """`tfds.data_source` on local files only (call require_prepared first).

  Asks for the version found on disk, so an older prepared version still reads
  after a TFDS upgrade bumps the builder's version.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  found = find_prepared(spec.name, data_dir, spec.splits)
  version = os.path.basename(found or '')
  name = f'{spec.name}:{version}' if re.fullmatch(r'\d+\.\d+\.\d+', version) else spec.name
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False, try_gcs=False)


def split_source(spec: Spec, split: str, data_dir: str) -> Any:
  """The random-access source for one of SPLITS.

  A dataset that ships train/validation/test is read as is. Otherwise
  'validation' is the last holdout_size(N) examples of TFDS 'train', 'train' is
  the rest, and 'test' is TFDS 'test' if it exists, else TFDS 'validation'
  (ImageNet: the official validation set papers report).
  """
  check_split(split)
  if set(SPLITS) <= set(spec.splits):
    return _Slice(*_full(open_source(spec, split, data_dir)))
  if split == 'test':
    official = 'test' if 'test' in spec.splits else 'validation'
    return _Slice(*_full(open_source(spec, official, data_dir)))
  train = open_source(spec, 'train', data_dir)
  n = len(train)
  cut = n - holdout_size(n)
  return _Slice(train, 0, cut) if split == 'train' else _Slice(train, cut, n)


def _full(source) -> tuple[Any, int, int]:
  return source, 0, len(source)


def first_records(source, limit_chars: int, text_of: Callable[[Any], str]) -> list[str]:
  """Texts from the start of a source until `limit_chars` characters (for tokenizer training).

  ArrayRecord order is TFDS's shuffled order, so a prefix is a random sample.
  """
  out, total = [], 0
  for i in range(len(source)):
    text = text_of(source[i])
    out.append(text)
    total += len(text)
    if total >= limit_chars:
      break
  return out


def tensorflow_available() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top

  return importlib.util.find_spec('tensorflow') is not None


def prepare_catalog(spec: Spec, data_dir: str, *, manual_dir: str = '') -> str:
  """Downloads and prepares a TFDS catalog dataset as ArrayRecord under `data_dir`.

  The catalog builders for lm1b, downsampled_imagenet and imagenet_resized call
  TensorFlow while generating (tf.io.gfile, tf.image.encode_png); we check
  first so the user gets the install line instead of a deep ImportError.
  Reading the result later needs no TensorFlow.
  """
  tfds_name = spec.name
  found = find_prepared(tfds_name, data_dir, spec.splits)
  if found:
    return found
  if spec.needs_tensorflow and not tensorflow_available():
    raise RuntimeError(
      f'preparing TFDS {tfds_name!r} needs TensorFlow (its catalog builder uses it to '
      f"generate; training never does): pip install 'performer-zoo[prepare]' "
      f'(or pip install tensorflow), then run this again'
    )
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.builder(tfds_name, data_dir=data_dir)
  config = tfds.download.DownloadConfig(manual_dir=manual_dir or None, try_download_gcs=False)
  builder.download_and_prepare(download_config=config, file_format='array_record')
  found = find_prepared(tfds_name, data_dir, spec.splits)
  if not found:
    raise RuntimeError(
      f'TFDS finished preparing {tfds_name!r} but no ArrayRecord files '
      f'for {spec.splits} are under {data_dir}/{tfds_name}'
    )
  return found


class Prepared(Dataset):
  """A dataset read from the ArrayRecord files `prepare` writes under data_dir."""

  def spec(self, cfg) -> Spec:
    raise NotImplementedError

  def prepare_args(self, cfg) -> str:
    """Flags the `prepare` command needs besides --data_dir (e.g. ' --variant X')."""
    del cfg
    return ''

  def require(self, cfg) -> str:
    """data_dir, once the prepared files are found (DatasetNotPreparedError otherwise)."""
    data_dir = data_dir_for(cfg)
    require_prepared(cfg.name, self.spec(cfg), data_dir, self.prepare_args(cfg))
    return data_dir

  def source(self, cfg, split: str):
    return split_source(self.spec(cfg), split, self.require(cfg))

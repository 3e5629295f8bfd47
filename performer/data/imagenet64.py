"""ImageNet 64x64 for autoregressive image models: 12,288 sub-pixel tokens per image.

Prepare once (needs network or the files by hand, TensorFlow for the TFDS
catalog builder, ~25 GB):

    python -m performer.data.prepare imagenet64 --data_dir ~/tensorflow_datasets

* Source (``config.data.variant``): 'downsampled_imagenet' (default; TFDS
  ``downsampled_imagenet/64x64``, van den Oord et al.'s set used by the
  Performer and Image Transformer papers) or 'imagenet_resized' (TFDS
  ``imagenet_resized/64x64``, Chrabaszcz et al.'s box-resized set).
* Tokens: the uint8 image in raster order (row, column, channel), so token
  ``(r * 64 + c) * 3 + ch`` is channel ch of pixel (r, c); values 0..255 are
  the token ids (vocabulary of 256, no special tokens: the image model
  prepends its own START). mask is all True, segment_ids all 1.
* Images of any other size are resized to 64x64 first with PIL's BOX filter
  (area averaging, the "box resize" both ImageNet64 sets were made with;
  the aspect ratio is not kept, also as in those sets). Grayscale images are
  repeated to 3 channels and an alpha channel is dropped.
* Splits: 'train' is TFDS train minus its last 10,000 images, which are
  'validation'; 'test' is the official ImageNet validation set (50,000
  images), the split papers report bits/dim on.
* ``config.data.image_size`` (optional, default 64) resizes to a smaller
  square instead, for smoke tests; seq_len must equal image_size**2 * 3.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from performer.data import catalog

_MANUAL = 'image-net.org may require a login: put '
VARIANTS = {  # config.data.variant -> what `prepare` downloads
  'downsampled_imagenet': catalog.Spec(
    'downsampled_imagenet/64x64',
    ('train', 'validation'),
    12.7,
    12.7,
    needs_tensorflow=True,
    note=_MANUAL + 'train_64x64.tar and valid_64x64.tar in <data_dir>/downloads/manual/ first',
  ),
  'imagenet_resized': catalog.Spec(
    'imagenet_resized/64x64',
    ('train', 'validation'),
    12.0,
    13.0,
    needs_tensorflow=True,
    note=_MANUAL + 'Imagenet64_train_part1_npz.zip, ..._part2_npz.zip and '
    'Imagenet64_val_npz.zip in <data_dir>/downloads/manual/',
  ),
}
DEFAULT_VARIANT = 'downsampled_imagenet'
IMAGE_SIZE = 64
CHANNELS = 3
SEQ_LEN = IMAGE_SIZE * IMAGE_SIZE * CHANNELS  # 12,288


class PixelVocab:
  """Sub-pixel values 0..255 are the token ids; there are no special tokens.

  The special ids are -1 ("no such token": never equal to a real id, and still
  an int for code that does int(vocab.mask_id)). encode/decode exist for the
  contract: a string of space-separated values.
  """

  size = 256
  pad_id = bos_id = eos_id = mask_id = -1

  def encode(self, text: str) -> list[int]:
    ids = [int(t) for t in text.split()]
    if any(not 0 <= i < 256 for i in ids):
      raise ValueError('sub-pixel values must be in [0, 256)')
    return ids

  def decode(self, ids) -> str:
    return ' '.join(str(int(i)) for i in np.asarray(ids).ravel())

  def __repr__(self):
    return 'PixelVocab(size=256)'


PIXEL_VOCAB = PixelVocab()


def to_rgb(image, size: int = IMAGE_SIZE) -> np.ndarray:
  """Any HxW, HxWx1, HxWx3 or HxWx4 uint8 image -> [size, size, 3] uint8 (BOX resize)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got dtype {image.dtype}')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
    raise ValueError(
      f'expected an image of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {image.shape}'
    )
  if image.shape[2] == 1:
    image = np.repeat(image, 3, axis=2)
  elif image.shape[2] == 4:
    image = image[:, :, :3]
  if image.shape[:2] != (size, size):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    image = np.asarray(
      Image.fromarray(np.ascontiguousarray(image)).resize((size, size), Image.Resampling.BOX)
    )
  return image


def image_to_tokens(image, size: int = IMAGE_SIZE) -> np.ndarray:
  """int32 [size * size * 3] in raster order (row, column, channel)."""
  return to_rgb(image, size).reshape(-1).astype(np.int32)


def tokens_to_image(tokens, size: int = IMAGE_SIZE) -> np.ndarray:
  """Inverse of image_to_tokens: [size, size, 3] uint8."""
  tokens = np.asarray(tokens)
  if tokens.size != size * size * CHANNELS:
    raise ValueError(f'expected {size * size * CHANNELS} tokens, got {tokens.size}')
  return tokens.reshape(size, size, CHANNELS).astype(np.uint8)


def bits_per_dim_from_total(total_nats: float, num_images: int, dims: int = SEQ_LEN) -> float:
  """Bits per dim from a summed negative log-likelihood (nats) over whole images."""
  return float(total_nats) / (num_images * dims * math.log(2.0))


def _record_tokens(record, size: int) -> np.ndarray:
  return image_to_tokens(record['image'], size)


class Imagenet64(catalog.Prepared):
  """One of the two TFDS ImageNet64 sets, each image as its sub-pixel tokens."""

  prepare_flags = ('variant',)

  def spec(self, cfg) -> catalog.Spec:
    variant = getattr(cfg, 'variant', '') or DEFAULT_VARIANT
    if variant not in VARIANTS:
      raise ValueError(f'config.data.variant must be one of {tuple(VARIANTS)}, got {variant!r}')
    return VARIANTS[variant]

  def prepare_args(self, cfg) -> str:
    return f' --variant {self.spec(cfg).builder_name}'

  def image_size(self, cfg) -> int:
    """config.data.image_size, after checking seq_len and pack fit whole images."""
    size = int(getattr(cfg, 'image_size', 0) or IMAGE_SIZE)
    if int(cfg.seq_len) != size * size * CHANNELS:
      raise ValueError(
        f'config.data.seq_len must be {size * size * CHANNELS} for {size}x{size}x3 '
        f'images (config.data.image_size={size}), got {cfg.seq_len}'
      )
    if getattr(cfg, 'pack', False):
      raise ValueError('config.data.pack must be False for images (every row is one image)')
    return size

  def vocab(self, cfg) -> PixelVocab:
    """The 256-value vocabulary; checks first that the dataset is prepared, so a training
    run without the data stops before it builds the model."""
    self.image_size(cfg)
    self.require(cfg)
    return PIXEL_VOCAB

  def encoder(self, cfg):
    size = self.image_size(cfg)
    self.require(cfg)
    return functools.partial(_record_tokens, size=size)

  def prepare(self, cfg) -> str:
    """Downloads and prepares the variant's TFDS dataset as ArrayRecord."""
    spec = self.spec(cfg)
    path = catalog.prepare_catalog(spec, catalog.data_dir_for(cfg), manual_dir=cfg.manual_dir)
    return f'imagenet64 ({spec.builder_name}) ready in {path}'


IMAGENET64 = Imagenet64()

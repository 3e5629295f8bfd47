"""ImageNet64 pipeline: resizing, raster order, bits per dim, mock-data batches, a tiny run.

Offline: the TFDS datasets are served by `tfds.testing.mock_data` (USE_CODE policy: random
images with the builder's feature spec; downsampled_imagenet's images have random sizes),
with the "is it prepared?" file check stubbed out.
"""

import math

import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from performer import data
from performer.data import catalog, imagenet64


def data_cfg(**kw):
  cfg = ml_collections.ConfigDict(
    dict(
      name='imagenet64',
      path='',
      seq_len=12288,
      crop='start',
      pack=False,
      data_dir='',
      variant='downsampled_imagenet',
      image_size=64,
    )
  )
  cfg.update(kw)
  return cfg


@pytest.fixture
def mock_images(monkeypatch, tmp_path):
  monkeypatch.setattr(catalog, 'find_prepared', lambda *a, **k: str(tmp_path / 'prepared'))
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    yield str(tmp_path)


@pytest.mark.parametrize(
  'shape', [(64, 64, 3), (1, 1, 3), (17, 33, 3), (100, 80, 3), (64, 64), (50, 70, 1), (40, 40, 4)]
)
def test_any_image_size_becomes_12288_tokens(shape):
  image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
  tokens = imagenet64.image_to_tokens(image)
  assert tokens.shape == (12288,) and tokens.dtype == np.int32
  assert 0 <= tokens.min() and tokens.max() < 256


def test_raster_order_row_column_channel():
  image = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
  tokens = imagenet64.image_to_tokens(image)  # already 64x64: no resampling at all
  for r, c, ch in [(0, 0, 0), (0, 0, 2), (0, 1, 0), (1, 0, 0), (63, 63, 2), (10, 20, 1)]:
    assert tokens[(r * 64 + c) * 3 + ch] == image[r, c, ch]
  np.testing.assert_array_equal(imagenet64.tokens_to_image(tokens), image)


def test_box_resize_is_area_averaging():
  block = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
  big = np.repeat(np.repeat(block, 2, axis=0), 2, axis=1)  # 128x128, constant 2x2 blocks
  np.testing.assert_array_equal(imagenet64.to_rgb(big), block)
  gray = np.full((30, 50), 77, np.uint8)
  np.testing.assert_array_equal(imagenet64.to_rgb(gray), np.full((64, 64, 3), 77, np.uint8))
  with pytest.raises(ValueError, match='uint8'):
    imagenet64.to_rgb(np.zeros((4, 4, 3), np.float32))


def test_bits_per_dim_on_known_distributions():
  assert data.bits_per_dim(math.log(256)) == pytest.approx(8.0)  # uniform over 256 values
  # A model that predicts p = (1/2, 1/4, 1/8, 1/8) on data drawn exactly from p scores
  # its entropy, 1.75 bits per sub-pixel.
  p = np.zeros(256)
  p[:4] = [0.5, 0.25, 0.125, 0.125]
  targets = np.array([0] * 4 + [1] * 2 + [2, 3])
  logits = np.log(np.maximum(p, 1e-30))[None].repeat(len(targets), 0)
  nats = float(optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean())
  assert data.bits_per_dim(nats) == pytest.approx(1.75, rel=1e-6)
  total = nats * len(targets)
  assert imagenet64.bits_per_dim_from_total(total, 1, dims=len(targets)) == pytest.approx(1.75)
  # The training loop's metric agrees (bits_per_dim = loss / ln 2).
  from performer import tasks  # pylint: disable=g-import-not-at-top

  sums = {'loss_sum': total, 'correct_sum': 4.0, 'weight_sum': float(len(targets))}
  assert tasks.TASKS['image_ar'].summary(sums)['bits_per_dim'] == pytest.approx(1.75)


@pytest.mark.parametrize('variant', ['downsampled_imagenet', 'imagenet_resized'])
def test_mock_batches(mock_images, variant):
  cfg = data_cfg(data_dir=mock_images, variant=variant)
  batch = next(data.build_dataset(cfg, split='train', batch_size=2, seed=0))
  assert batch['tokens'].shape == (2, 12288) and batch['tokens'].dtype == np.int32
  assert batch['tokens'].min() >= 0 and batch['tokens'].max() < 256
  assert batch['mask'].dtype == bool and batch['mask'].all()
  assert batch['segment_ids'].dtype == np.int32 and (batch['segment_ids'] == 1).all()
  # 20 mock train images: the last 2 (a tenth) are validation; 3 rows -> 1 filler row.
  val = list(data.build_dataset(cfg, split='validation', batch_size=3))
  assert len(val) == 1 and val[0]['mask'].all(axis=1).tolist() == [True, True, False]
  assert not val[0]['mask'][2].any()
  test = list(data.build_dataset(cfg, split='test', batch_size=8))  # official validation
  assert sum(int(b['mask'].any(axis=1).sum()) for b in test) == 20
  assert data.vocab_for(cfg).size == 256
  small = next(
    data.build_dataset(
      data_cfg(data_dir=mock_images, variant=variant, image_size=8, seq_len=192),
      split='train',
      batch_size=2,
    )
  )
  assert small['tokens'].shape == (2, 192)  # optional smaller resize for smoke tests


def test_bad_options():
  with pytest.raises(ValueError, match='seq_len must be 12288'):
    data.build_dataset(data_cfg(seq_len=1024), split='train', batch_size=1)
  with pytest.raises(ValueError, match='pack must be False'):
    data.build_dataset(data_cfg(pack=True), split='train', batch_size=1)
  with pytest.raises(ValueError, match='variant'):
    data.build_dataset(data_cfg(variant='imagenet'), split='train', batch_size=1)


@pytest.mark.slow
def test_tiny_imagenet64_training_run(mock_images, tmp_path, tiny):
  """A tiny image model on full 64x64x3 images (12,288 tokens) through the real pipeline."""
  from performer.training import train_lib  # pylint: disable=g-import-not-at-top

  config = tiny(
    data__name='imagenet64',
    data__data_dir=mock_images,
    data__seq_len=12288,
    data__crop='start',
    model__task='image_ar',
    model__image_shape='(64, 64, 3)',
    model__vocab_size=256,
    model__max_len=12288,
    model__positions='axial',
    model__attention__chunk_size=256,
    train__num_steps=2,
    train__eval_every=0,
    train__checkpoint_every=0,
    train__redraw_every=0,
    train__log_every=1,
    train__batch_size=2,
  )
  out = train_lib.train_and_evaluate(config, str(tmp_path / 'work'), progress=False)
  assert out['step'] == 2
  final = out['final']['test']
  assert final['tokens'] == 20 * 12288  # every test image once, filler rows not scored
  assert final['bits_per_dim'] == pytest.approx(final['loss'] / math.log(2))
  assert 4.0 < final['bits_per_dim'] < 12.0  # near-uniform after 2 steps: about 8

"""Swin padding invariance, without the reference: the per-image window
geometry (roll, shifted-window regions) equals the reference's on each
image's own padded map, and the backbone on a padded canvas gives each
image's unpadded, batch-1 maps in its top-left block.  The reference's own
batch-1 runs are checked in tests/test_swin_verify.py (tiny_swin_single)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddq_jax.model import swin, swin_windows
from ddq_jax.model.extents import image_extents


@pytest.mark.parametrize('shift', [2, -2, 3, -1])
def test_per_image_roll_is_the_roll_of_each_own_block(shift):
  x = jax.random.normal(jax.random.key(0), (3, 12, 16, 2))
  padded = np.array([[8, 12], [12, 16], [4, 8]], np.int32)
  out = np.asarray(swin_windows.per_image_roll(x, jnp.asarray(padded),
                                               shift=shift))
  for b, (h, w) in enumerate(padded):
    block = np.roll(np.asarray(x[b, :h, :w]), (shift, shift), (0, 1))
    np.testing.assert_array_equal(out[b, :h, :w], block)
    rest = np.ones((12, 16), bool)
    rest[:h, :w] = False
    np.testing.assert_array_equal(np.sort(out[b][rest], axis=0),
                                  np.sort(np.asarray(x[b])[rest], axis=0))


@pytest.mark.parametrize('window,shift', [(4, 2), (6, 3), (7, 3)])
def test_shifted_window_regions_give_the_reference_mask(window, shift):
  """On the canvas, the windows inside each image's own padded map get the
  reference's mask of that padded map (shifted_window_mask)."""
  shape = (4 * window, 5 * window)
  padded = np.array([[window, 2 * window], [3 * window, 5 * window],
                     [4 * window, window]], np.int32)
  regions = np.asarray(swin_windows.shifted_window_regions(
      jnp.asarray(padded), shape=shape, window=window, shift=shift))
  n_w = (shape[0] // window) * (shape[1] // window)
  regions = regions.reshape(len(padded), shape[0] // window,
                            shape[1] // window, window * window)
  for b, (h, w) in enumerate(padded):
    ref = swin_windows.shifted_window_mask(int(h), int(w), window=window,
                                           shift=shift)
    ours = regions[b, :h // window, :w // window].reshape(
        -1, window * window)
    mask = np.where(ours[:, None, :] != ours[:, :, None], -100.0, 0.0)
    np.testing.assert_array_equal(mask, ref)
  assert regions.size == len(padded) * n_w * window * window


def _backbone(**kw):
  args = dict(embed_dims=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
              window_size=6, strides=(4, 2, 2), out_indices=(0, 1, 2),
              drop_path_rate=0.0)
  args.update(kw)
  return swin.SwinTransformer(**args)


# (image sizes, canvas): odd sizes, none a multiple of the window at any
# stage; a canvas no stage's window grid divides; a canvas one image fills.
CASES = [(((77, 131), (101, 59)), (128, 160)),
         (((50, 98), (97, 150)), (97, 150))]


@pytest.mark.parametrize('sizes,canvas,scan', [CASES[0] + (False,),
                                              CASES[1] + (False,),
                                              CASES[0] + (True,)])
def test_backbone_on_a_canvas_gives_each_image_alone(sizes, canvas, scan):
  """Window 6, shifted blocks at every stage: every output map's valid
  block equals the image run alone at its own size, whatever shares the
  batch; the reference's batched padding (no extents) does not, unless
  the image fills the canvas."""
  model = _backbone(scan=scan)
  keys = jax.random.split(jax.random.key(0), len(sizes))
  images = [jax.random.normal(k, s + (3,)) for k, s in zip(keys, sizes)]
  params = jax.jit(model.init)(jax.random.key(1), images[0][None])['params']
  apply = jax.jit(lambda x, e=None: model.apply({'params': params}, x, e))
  canvas_x = np.zeros((len(sizes),) + canvas + (3,), np.float32)
  pad = np.ones((len(sizes),) + canvas, bool)
  for i, (im, (h, w)) in enumerate(zip(images, sizes)):
    canvas_x[i, :h, :w] = im
    pad[i, :h, :w] = False
  # Garbage outside the images: zeroed by the extents, as the padding.
  canvas_x[pad] = 7.0
  invariant = apply(canvas_x, image_extents(pad))
  batched = apply(canvas_x)
  for i, im in enumerate(images):
    alone = apply(im[None])
    padded = sizes[i] != canvas
    for lvl, (a, c, d) in enumerate(zip(alone, invariant, batched)):
      h, w = a.shape[1:3]
      scale = float(jnp.abs(a).max())
      err = float(jnp.abs(c[i, :h, :w] - a[0]).max())
      assert err <= 1e-5 * scale, (i, lvl, err, scale)
      assert not c[i, h:].any() and not c[i, :, w:].any()
      batched_err = float(jnp.abs(d[i, :h, :w] - a[0]).max())
      assert batched_err > 1e-2 * scale if padded else batched_err == 0.0


def test_out_strides():
  assert _backbone().out_strides == (4, 8, 16)
  assert _backbone(out_indices=(1, 2)).out_strides == (8, 16)

"""Record mmdetection 3.3.0's Swin DDQ-DETR on one image at a time.

Not part of the test suite: it needs torch, mmcv 2.1.0 (built with its ops)
and mmdet 3.3.0.  The model is the Swin golden fixture's (``../tiny_swin``:
``mmdet_config.py`` and ``checkpoint.pth``); the images are
``../tiny_single/{a,b}``'s (77x131 with scale factor 0.7, and 139x83), the
model's normalised input as is.  Each is run alone, as the reference's test
loop evaluates: batch 1, ``batch_input_shape`` = ``img_shape``, so nothing
is padded and no mask is passed.  Neither side is a multiple of the patch
size, of the window (4) or of any feature stride, so the patch embedding's
and every block's own padding, the shifted windows' wrap and the patch
mergings' padding are all exercised.

The intermediates are taken from the reference's own methods (backbone and
neck outputs, ``pre_transformer``, ``forward_encoder``,
``gen_encoder_output_proposals``, ``pre_decoder``, ``forward_decoder``, the
head's forward, the encoder NMS's keep list and the decoder's cached
distinct masks) under the golden fixtures' key names and layouts.  The NMS
sorts are stable (``../published/record_reference.py``'s
``stable_batched_nms``: ties in index order).

``--check`` first records the fixture's own batch (``../tiny_swin``: two
images on one 128x124 canvas) the same way and asserts that every array
equals ``../tiny_swin/infer.npz``: the hooks read what the fixtures hold.

    python record_reference.py [--check]

writes ``{a,b}/inputs.npz`` (images, pad_mask, img_shapes, scale_factors),
``{a,b}/infer.npz`` and ``settings.json`` next to this file.
"""
import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SWIN = os.path.join(HERE, '..', 'tiny_swin')
SINGLE = os.path.join(HERE, '..', 'tiny_single')
NAMES = ('a', 'b')
INPUT_KEYS = ('images', 'pad_mask', 'img_shapes', 'scale_factors')


def _published_recorder():
  path = os.path.join(HERE, '..', 'published', 'record_reference.py')
  sys.path.insert(0, os.path.dirname(path))
  spec = importlib.util.spec_from_file_location('published_recorder', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _np(x):
  return x.detach().numpy().copy()


def build(pub):
  """The reference model with the fixture's weights, stable NMS sorts and
  hooks that leave every intermediate in the returned dict."""
  from mmengine.config import Config
  from mmdet.registry import MODELS
  from mmdet.utils import register_all_modules
  register_all_modules()
  cfg = Config.fromfile(os.path.join(SWIN, 'mmdet_config.py'))
  model = MODELS.build(cfg.model)
  ckpt = torch.load(os.path.join(SWIN, 'checkpoint.pth'), map_location='cpu',
                    weights_only=False)
  missing, unexpected = model.load_state_dict(ckpt.get('state_dict', ckpt),
                                              strict=False)
  assert not unexpected, unexpected[:5]
  assert all(k.endswith('num_batches_tracked') for k in missing), missing[:5]
  model.eval()
  rec, keeps = {}, []
  import mmdet.models.detectors.ddq_detr as det_mod
  import mmdet.models.layers.transformer.ddq_detr_layers as layer_mod

  def recording_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
    dets, keep = pub.stable_batched_nms(boxes, scores, idxs, nms_cfg,
                                        class_agnostic)
    keeps.append(keep.clone())
    return dets, keep
  det_mod.batched_nms = recording_nms
  layer_mod.batched_nms = pub.stable_batched_nms

  def wrap(obj, name, after):
    inner = getattr(obj, name)

    def wrapped(*args, **kwargs):
      out = inner(*args, **kwargs)
      after(out)
      return out
    setattr(obj, name, wrapped)

  wrap(model.backbone, 'forward', lambda out: rec.update(
      {f'backbone_feat_{i}': _np(f) for i, f in enumerate(out)}))
  wrap(model.neck, 'forward', lambda out: rec.update(
      {f'neck_feat_{i}': _np(f) for i, f in enumerate(out)}))

  def pre_transformer(out):
    enc, dec = out
    feat = enc['feat']
    mask = enc['feat_mask']
    rec['feat_mask'] = (_np(mask) if mask is not None
                        else np.zeros(feat.shape[:2], bool))
    rec['feat_pos'] = _np(enc['feat_pos'])
    rec['spatial_shapes'] = _np(enc['spatial_shapes'])
    rec['level_start_index'] = _np(enc['level_start_index'])
    rec['valid_ratios'] = _np(enc['valid_ratios'])
  wrap(model, 'pre_transformer', pre_transformer)

  def forward_encoder(out):
    rec['memory'] = _np(out['memory'])
    mask = out['memory_mask']
    rec['memory_mask'] = (_np(mask) if mask is not None
                          else np.zeros(out['memory'].shape[:2], bool))
  wrap(model, 'forward_encoder', forward_encoder)
  wrap(model, 'gen_encoder_output_proposals', lambda out: rec.update(
      output_memory=_np(out[0]), output_proposals=_np(out[1])))
  wrap(model, 'pre_decoder', lambda out: rec.update(
      decoder_query_in=_np(out[0]['query']),
      decoder_reference_in=_np(out[0]['reference_points'])))
  wrap(model, 'forward_decoder', lambda out: rec.update(
      hidden_states=_np(out['hidden_states']),
      references=np.stack([_np(r) for r in out['references']])))
  wrap(model.bbox_head, 'forward', lambda out: rec.update(
      all_layers_cls_scores=_np(out[0]), all_layers_bbox_preds=_np(out[1])))
  return model, rec, keeps


def data_samples(inputs, canvas):
  from mmdet.structures import DetDataSample
  out = []
  for (h, w), (fw, fh) in zip(inputs['img_shapes'], inputs['scale_factors']):
    h, w = int(h), int(w)
    d = DetDataSample()
    d.set_metainfo(dict(img_shape=(h, w), batch_input_shape=canvas,
                        pad_shape=(h, w), scale_factor=(float(fw), float(fh)),
                        ori_shape=(int(round(h / float(fh))),
                                   int(round(w / float(fw))))))
    out.append(d)
  return out


def record(model, rec, keeps, inputs):
  """The reference's inference on ``inputs`` (one batch) -> fixture keys."""
  rec.clear()
  keeps.clear()
  images = np.asarray(inputs['images'], np.float32)
  canvas = images.shape[1:3]
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    res = model.predict(x, data_samples(inputs, tuple(canvas)), rescale=True)
  out = dict(rec)
  n = len(res)
  q = model.num_queries
  topk = np.full((n, q), -1, np.int64)
  for i, k in enumerate(keeps):
    k = k.numpy()[:q]
    topk[i, :len(k)] = k
  out['topk_indices'] = topk
  out['num_kept_after_nms'] = np.array([len(k) for k in keeps])
  heads = model.cache_dict['num_heads']
  for l, inv in enumerate(model.cache_dict['distinct_query_mask']):
    rows = torch.stack([inv[i * heads] for i in range(n)])
    out[f'distinct_keep_{l}'] = rows.all(-1).numpy()
    out[f'head_query_mask_{l}'] = rows[:, 0].numpy()
  for key, field in (('det_bboxes', 'bboxes'), ('det_scores', 'scores'),
                     ('det_labels', 'labels')):
    out[key] = np.stack([getattr(r.pred_instances, field).numpy()
                         for r in res])
  return out


def _load(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def check(model, rec, keeps):
  """The fixture's own batch, recorded here, equals its infer.npz."""
  ref = _load(os.path.join(SWIN, 'infer.npz'))
  ours = record(model, rec, keeps, _load(os.path.join(SWIN, 'inputs.npz')))
  assert sorted(ours) == sorted(ref), set(ours) ^ set(ref)
  for k in sorted(ref):
    assert ours[k].shape == ref[k].shape, (k, ours[k].shape, ref[k].shape)
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
  print(f'check: {len(ref)} arrays equal ../tiny_swin/infer.npz', flush=True)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--check', action='store_true',
                 help="first reproduce ../tiny_swin/infer.npz with the hooks")
  a = p.parse_args()
  torch.set_num_threads(2)
  import mmdet
  model, rec, keeps = build(_published_recorder())
  if a.check:
    check(model, rec, keeps)
  for name in NAMES:
    src = _load(os.path.join(SINGLE, name, 'inputs.npz'))
    inputs = {k: src[k] for k in INPUT_KEYS}
    assert not inputs['pad_mask'].any() and inputs['images'].shape[0] == 1
    out = record(model, rec, keeps, inputs)
    d = os.path.join(HERE, name)
    os.makedirs(d, exist_ok=True)
    np.savez_compressed(os.path.join(d, 'inputs.npz'), **inputs)
    np.savez_compressed(os.path.join(d, 'infer.npz'), **out)
    print(name, tuple(inputs['img_shapes'][0]),
          {k: np.shape(v) for k, v in out.items()
           if k.startswith(('backbone', 'det_', 'topk'))}, flush=True)
  with open(os.path.join(HERE, 'settings.json'), 'w') as f:
    json.dump(dict(images='../tiny_single/{a,b}/inputs.npz',
                   weights='../tiny_swin/checkpoint.pth',
                   config='../tiny_swin/mmdet_config.py', batch=1,
                   sort='stable', mmdet=mmdet.__version__,
                   torch=torch.__version__), f, indent=1)


if __name__ == '__main__':
  main()

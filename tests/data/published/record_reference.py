"""Record mmdetection 3.3.0's DDQ-DETR at the published R50 4-scale size.

Not part of the test suite: it needs torch, mmcv 2.1.0 (built with its ops)
and mmdet 3.3.0.  It reproduces mmdetection's own detector test
(tests/test_models/test_detectors/test_ddq_detr.py): the published config at
full size, weights from a fresh initialisation, uniform random images, the
two COCO annotations of tests/data/coco_batched_sample.json (704x929 and
800x1067, batched on an 800x1067 canvas), and an 800x1067 image without
ground truth.  The denoising noise scales are 1e-12 (the reference asserts
they are > 0), so the denoising queries are the ground truth itself and no
random draw enters.

Weights (--weights): an .npz of reference-named tensors (written by
``make_inputs.py`` from ddq-jax's ``init_variables``, which reproduces
``init_weights``' distributions), so that the test suite can rebuild them
without torch; or --torch-init SEED for mmdetection's own ``init_weights()``.

Ties (--sort): the reference's NMS and its dense top-k sort with torch's
unstable CPU sort, so among exactly equal scores (the invalid proposals:
padding, or centre outside (0.01, 0.99)) the kept position depends on the
sort's internals.  ``--sort stable`` patches ``batched_nms`` with the same
arithmetic and stable sorts (ties in index order, as ddq-jax); ``--sort
torch`` records the reference as it is.  Both are recorded; the difference
is the tie's effect.

    python record_reference.py --variant r50_4scale --weights init.npz \
        --sort stable

writes <variant>_coco/{infer,train}.npz and <variant>_empty/train.npz
(``--sort torch``: torch_sort_{infer,train}.npz beside them) next to this
file, in the golden fixtures' key names; only small arrays: selections,
decoder keep sets, detections, loss terms, a few gradients.
"""
import argparse
import json
import os

import numpy as np
import torch

from make_inputs import CANVAS, SAMPLES

GRADS = ('query_map.weight', 'memory_trans_fc.weight',
         'encoder.layers.0.self_attn.sampling_offsets.weight',
         'decoder.layers.0.self_attn.attn.in_proj_weight',
         'bbox_head.cls_branches.6.bias', 'bbox_head.reg_branches.0.4.weight',
         'backbone.layer4.0.conv1.weight', 'neck.extra_convs.0.gn.weight')


def images(seed, n):
  """The inputs the model sees (no normalisation, as the peer test's
  torch.rand): uniform [0, 1) float32, NHWC as ddq-jax generates them."""
  return np.random.default_rng(seed).random((n,) + CANVAS + (3,),
                                            dtype=np.float32)


def stable_batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
  """mmcv 2.1.0 batched_nms (idxs all ones, the CPU kernel's float32
  arithmetic) with stable sorts: ties in index order."""
  if nms_cfg is None:
    s, inds = scores.sort(descending=True, stable=True)
    return torch.cat([boxes[inds], s[:, None]], -1), inds
  assert not class_agnostic and not nms_cfg.get('class_agnostic', False)
  thr = float(nms_cfg['iou_threshold'])
  offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
  b = boxes + offsets[:, None]
  order = scores.sort(descending=True, stable=True)[1]
  b = b[order]
  x1, y1, x2, y2 = b.unbind(1)
  areas = (x2 - x1) * (y2 - y1)
  select = torch.ones(len(order), dtype=torch.bool)
  sel = select.numpy()
  for i in range(len(order)):
    if not sel[i]:
      continue
    xx1 = torch.maximum(x1[i], x1[i + 1:])
    yy1 = torch.maximum(y1[i], y1[i + 1:])
    xx2 = torch.minimum(x2[i], x2[i + 1:])
    yy2 = torch.minimum(y2[i], y2[i + 1:])
    w = (xx2 - xx1).clamp(min=0)
    h = (yy2 - yy1).clamp(min=0)
    inter = w * h
    ovr = inter / (areas[i] + areas[i + 1:] - inter)
    select[i + 1:] &= ~(ovr > thr)
  keep = order[select]
  return torch.cat([boxes[keep], scores[keep][:, None]], -1), keep


def capture_dn_queries(model, store):
  """Wraps the denoising query generator so each call leaves the queries
  it drew in ``store``, in the fixtures' slot layout: ``dn_label_ids``
  (B, D) noisy class ids (-1 = padded slot) and ``dn_reference_points``
  (B, D, 4) sigmoid cxcywh (padded slots 0.5)."""
  gen = model.dn_query_generator
  ids = []
  emb = gen.label_embedding
  emb_forward = emb.forward

  def record_ids(x):
    ids.append(x.detach().clone())
    return emb_forward(x)
  emb.forward = record_ids
  call = type(gen).__call__

  def wrapped(batch_data_samples):
    ids.clear()
    label_q, bbox_q, attn_mask, meta = call(gen, batch_data_samples)
    if not ids or not len(ids[-1]):
      return label_q, bbox_q, attn_mask, meta
    batch_idx = torch.cat([torch.full((len(s.gt_instances.labels),), i,
                                      dtype=torch.long)
                           for i, s in enumerate(batch_data_samples)])
    flat = (ids[-1].float() + 1).reshape(-1, 1)
    n_groups = meta['num_denoising_groups']
    slots, _ = gen.collate_dn_queries(flat, bbox_q.new_zeros(len(flat), 4),
                                      batch_idx, len(batch_data_samples),
                                      n_groups)
    store['dn_label_ids'] = (slots[..., 0].round().long() - 1).numpy()
    store['dn_reference_points'] = bbox_q.detach().sigmoid().numpy()
    store['dn_attn_mask'] = attn_mask.numpy()
    store['dn_num_groups'] = np.int64(n_groups)
    return label_q, bbox_q, attn_mask, meta
  type(gen).__call__ = lambda self, samples: wrapped(samples)


def build(cfg_file, *, weights, torch_init, sort, dn_noise='tiny'):
  from mmengine.config import Config
  from mmdet.registry import MODELS
  from mmdet.utils import register_all_modules
  register_all_modules()
  cfg = Config.fromfile(cfg_file)
  m = cfg.model
  m.backbone.init_cfg = None   # no download: random ResNet, as in CI
  if dn_noise == 'tiny':
    m.dn_cfg.label_noise_scale = 1e-12
    m.dn_cfg.box_noise_scale = 1e-12
  model = MODELS.build(m)
  torch.manual_seed(torch_init or 0)
  model.init_weights()
  if weights:
    with np.load(weights) as f:
      sd = {k: torch.from_numpy(f[k]) for k in f.files}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected[:5]
    assert all(k.endswith('num_batches_tracked') for k in missing), missing[:5]
  records = []
  import mmdet.models.detectors.ddq_detr as det_mod
  import mmdet.models.layers.transformer.ddq_detr_layers as layer_mod
  from mmcv.ops import batched_nms as torch_batched_nms
  inner = stable_batched_nms if sort == 'stable' else torch_batched_nms

  def recording(boxes, scores, idxs, nms_cfg, class_agnostic=False):
    dets, keep = inner(boxes, scores, idxs, nms_cfg, class_agnostic)
    records.append((nms_cfg is None, keep.clone()))
    return dets, keep

  det_mod.batched_nms = recording
  layer_mod.batched_nms = inner
  return model, records


def data_samples(with_gt):
  from mmengine.structures import InstanceData
  from mmdet.structures import DetDataSample
  out = []
  for s in (SAMPLES if with_gt else [dict(img_shape=CANVAS,
                                           scale_factor=(1.0, 1.0),
                                           labels=[], bboxes=[])]):
    d = DetDataSample()
    d.set_metainfo(dict(img_shape=s['img_shape'], batch_input_shape=CANVAS,
                        pad_shape=s['img_shape'],
                        scale_factor=s['scale_factor'],
                        ori_shape=tuple(int(round(v / f)) for v, f in zip(
                            s['img_shape'], s['scale_factor'][::-1]))))
    gt = InstanceData()
    gt.labels = torch.LongTensor(s['labels'])
    gt.bboxes = torch.Tensor(s['bboxes']).reshape(-1, 4)
    d.gt_instances = gt
    out.append(d)
  return out


def decoder_keeps(model, n_img):
  """distinct_keep_{l}, head_query_mask_{l} (B, Q) from the decoder's
  cached inverted masks, as the fixtures store them."""
  out = {}
  heads = model.cache_dict['num_heads']
  for l, inv in enumerate(model.cache_dict['distinct_query_mask']):
    rows = torch.stack([inv[i * heads] for i in range(n_img)])
    out[f'distinct_keep_{l}'] = rows.all(-1).numpy()
    out[f'head_query_mask_{l}'] = rows[:, 0].numpy()
  return out


def encoder_keeps(records, n_img, num_queries, dense_topk):
  out = {}
  distinct = [k for dense, k in records if not dense]
  dense = [k for dense, k in records if dense]
  topk = np.full((n_img, num_queries), -1, np.int64)
  for i, k in enumerate(distinct):
    k = k.numpy()[:num_queries]
    topk[i, :len(k)] = k
  out['topk_indices'] = topk
  out['num_kept_after_nms'] = np.array([len(k) for k in distinct])
  if dense:
    out['dense_topk_indices'] = np.stack([k.numpy()[:dense_topk]
                                          for k in dense])
  return out


def run_case(model, records, x, with_gt, *, train):
  records.clear()
  samples = data_samples(with_gt)
  n = x.shape[0]
  if not train:
    model.eval()
    with torch.no_grad():
      res = model.predict(x, samples, rescale=True)
    out = encoder_keeps(records, n, model.num_queries, 0)
    out.update(decoder_keeps(model, n))
    out['det_bboxes'] = np.stack([r.pred_instances.bboxes.numpy()
                                  for r in res])
    out['det_scores'] = np.stack([r.pred_instances.scores.numpy()
                                  for r in res])
    out['det_labels'] = np.stack([r.pred_instances.labels.numpy()
                                  for r in res])
    return out
  model.train()
  model.zero_grad()
  losses = model.loss(x, samples)
  out = {}
  total = 0
  for k, v in losses.items():
    v = sum(v) if isinstance(v, (list, tuple)) else v
    out[f'loss/{k}'] = np.float32(v.item())
    if 'loss' in k:
      total = total + v
  out['loss_total'] = np.float32(total.item())
  total.backward()
  params = dict(model.named_parameters())
  for name in GRADS:
    out[f'grad/{name}'] = params[name].grad.numpy().copy()
  out['grad_global_norm'] = np.float32(torch.norm(torch.stack([
      p.grad.norm() for p in model.parameters()
      if p.requires_grad and p.grad is not None])).item())
  out.update(encoder_keeps(records, n, model.num_queries,
                           int(model.num_queries * model.dense_topk_ratio)))
  out.update(decoder_keeps(model, n))
  return out


CONFIGS = {'r50_4scale': 'ddq-detr-4scale_r50_8xb2-12e_coco.py',
           'r50_5scale': 'ddq-detr-5scale_r50_8xb2-12e_coco.py'}
HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', choices=sorted(CONFIGS), default='r50_4scale')
  p.add_argument('--cases', default='coco_infer,coco_train,empty_train')
  p.add_argument('--weights', help='reference-named .npz')
  p.add_argument('--torch-init', type=int, default=None)
  p.add_argument('--sort', choices=('stable', 'torch'), required=True)
  p.add_argument('--image-seed', type=int, default=1)
  p.add_argument('--out', default=HERE, help='folder of the bundles')
  p.add_argument('--dn-noise', choices=('tiny', 'real'), default='real',
                 help="'real': the config's noise, the drawn queries written "
                 "into the bundle's inputs.npz for injection; 'tiny': 1e-12 "
                 '(the queries are the ground truth)')
  a = p.parse_args()
  torch.set_num_threads(2)
  import mmdet
  cfg_file = os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs',
                          'ddq', CONFIGS[a.variant])
  model, records = build(cfg_file, weights=a.weights,
                         torch_init=a.torch_init, sort=a.sort,
                         dn_noise=a.dn_noise)
  torch.manual_seed(0)   # the denoising draws
  dn = {}
  capture_dn_queries(model, dn)
  if a.torch_init is not None:  # the weights, for ddq-jax to load
    os.makedirs(a.out, exist_ok=True)
    torch.save({'state_dict': model.state_dict()},
               os.path.join(a.out, f'{a.variant}_torch_init.pth'))
  x = torch.from_numpy(images(a.image_seed, 2).transpose(0, 3, 1, 2).copy())
  prefix = '' if a.sort == 'stable' else 'torch_sort_'
  for case in a.cases.split(','):
    data, mode = case.split('_')
    arrays = run_case(model, records, x if data == 'coco' else x[:1],
                      data == 'coco', train=mode == 'train')
    d = os.path.join(a.out, f'{a.variant}_{data}')
    os.makedirs(d, exist_ok=True)
    if mode == 'train' and dn and a.dn_noise == 'real':
      path = os.path.join(d, 'inputs.npz')
      with np.load(path) as f:
        inputs = {k: f[k] for k in f.files}
      inputs.update(dn)
      np.savez_compressed(path, **inputs)
      dn.clear()
    np.savez_compressed(os.path.join(d, f'{prefix}{mode}.npz'), **arrays)
    print(case, {k: (np.asarray(v).tolist() if np.size(v) < 3
                     else np.shape(v))
                 for k, v in arrays.items() if not k.startswith('grad/')},
          flush=True)
    with open(os.path.join(d, f'{prefix}settings.json'), 'w') as f:
      json.dump(dict(image_seed=a.image_seed, sort=a.sort,
                     weights=os.path.basename(a.weights or ''),
                     torch_init=a.torch_init, mmdet=mmdet.__version__,
                     torch=torch.__version__), f, indent=1)


if __name__ == '__main__':
  main()

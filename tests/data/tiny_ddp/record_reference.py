"""Record mmdetection 3.3.0's DDQ-DETR training step on two "GPUs" as DDP.

Not part of the test suite: it needs torch, mmcv 2.1.0 (built with its ops)
and mmdet 3.3.0.  The model is the tiny fixture's (``../tiny``:
``mmdet_config.py`` and ``checkpoint.pth``); the batch is four images on
one 128x128 canvas, two per GPU, whose ground-truth counts differ between
the GPUs (6 and 3 on GPU 0, 2 and 1 on GPU 1), so the denoising queries of
each GPU have their own group count and slot layout.

DDP without a process group: each GPU's ``model.loss`` is a call on its two
images.  A first pass records, per GPU and in call order, the values every
``reduce_mean`` (mmdet.utils) receives; the second pass runs each GPU again
with ``reduce_mean`` returning the mean over the GPUs of the same call's
values (what ``dist.all_reduce`` of value / world_size gives), then
backward.  DDP's gradient is the mean of the GPUs' gradients; each GPU logs
its own loss dict.

The denoising noise scales are 1e-12 (the reference asserts they are > 0),
so the denoising queries are the ground truth itself and no random draw
enters; the NMS sorts are stable (``../published/record_reference.py``'s
``stable_batched_nms``: ties in index order).

    python record_reference.py

writes ``inputs.npz`` (images_seed, pad_mask, img_shapes, gt_*),
``train.npz`` (``gpu{r}/loss/*`` each GPU's loss dict, ``gpu{r}/dn_*`` its
denoising layout and attention mask, ``loss/*`` the GPUs' mean,
``grad/*`` a few tensors of DDP's averaged gradient and
``grad_global_norm``) and ``settings.json`` next to this file.
"""
import importlib.util
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, '..', 'tiny')
CANVAS = (128, 128)
IMAGES_SEED = 7
GT_SEED = 11
# (h, w) and the ground-truth count of each image; images 2r, 2r + 1 are
# GPU r's.
IMG_SHAPES = ((96, 128), (128, 104), (128, 120), (112, 128))
NUM_GTS = (6, 3, 2, 1)
MAX_GT = 6
PER_GPU = 2
GRADS = ('backbone.layer2.0.conv1.weight', 'neck.convs.0.conv.weight',
         'encoder.layers.0.self_attn.sampling_offsets.weight',
         'decoder.layers.1.self_attn.attn.in_proj_weight',
         'decoder.layers.0.cross_attn.value_proj.weight',
         'query_map.weight', 'memory_trans_fc.weight',
         'dn_query_generator.label_embedding.weight',
         'bbox_head.cls_branches.0.weight', 'bbox_head.reg_branches.1.4.bias',
         'bbox_head.aux_cls_branches.0.bias',
         'bbox_head.aux_reg_branches.1.0.weight')


def _published_recorder():
  path = os.path.join(HERE, '..', 'published', 'record_reference.py')
  sys.path.insert(0, os.path.dirname(path))
  spec = importlib.util.spec_from_file_location('published_recorder', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def make_inputs():
  """The fixture's inputs (the images themselves: uniform [0, 1) float32
  over the canvas from ``images_seed``, as ``verify.bundle_inputs``)."""
  rng = np.random.default_rng(GT_SEED)
  n = len(IMG_SHAPES)
  boxes = np.zeros((n, MAX_GT, 4), np.float32)
  labels = np.zeros((n, MAX_GT), np.int64)
  valid = np.zeros((n, MAX_GT), bool)
  pad = np.ones((n,) + CANVAS, bool)
  for i, ((h, w), g) in enumerate(zip(IMG_SHAPES, NUM_GTS)):
    pad[i, :h, :w] = False
    x1 = rng.uniform(0, 0.7 * w, g)
    y1 = rng.uniform(0, 0.7 * h, g)
    x2 = np.minimum(x1 + rng.uniform(0.1 * w, 0.5 * w, g), w)
    y2 = np.minimum(y1 + rng.uniform(0.1 * h, 0.5 * h, g), h)
    boxes[i, :g] = np.stack([x1, y1, x2, y2], -1)
    labels[i, :g] = rng.integers(0, 80, g)
    valid[i, :g] = True
  images = np.random.default_rng(IMAGES_SEED).random(
      (n,) + CANVAS + (3,), dtype=np.float32)
  return dict(images_seed=np.int64(IMAGES_SEED), pad_mask=pad,
              img_shapes=np.array(IMG_SHAPES, np.int64), gt_boxes=boxes,
              gt_labels=labels, gt_valid=valid), images


def data_samples(inputs, rows):
  from mmengine.structures import InstanceData
  from mmdet.structures import DetDataSample
  out = []
  for i in rows:
    h, w = (int(v) for v in inputs['img_shapes'][i])
    d = DetDataSample()
    d.set_metainfo(dict(img_shape=(h, w), batch_input_shape=CANVAS,
                        pad_shape=(h, w), scale_factor=(1.0, 1.0),
                        ori_shape=(h, w)))
    gt = InstanceData()
    v = inputs['gt_valid'][i]
    gt.labels = torch.from_numpy(inputs['gt_labels'][i][v])
    gt.bboxes = torch.from_numpy(inputs['gt_boxes'][i][v]).reshape(-1, 4)
    d.gt_instances = gt
    out.append(d)
  return out


class ReduceMean:
  """Stands in for ``mmdet.utils.reduce_mean`` in every module that
  imported it: 'record' keeps each call's value; 'mean' returns the mean
  over the GPUs of the same call's recorded values."""

  def __init__(self):
    self.mode, self.gpu, self.calls, self.values = 'record', 0, 0, {}

  def start(self, mode, gpu):
    self.mode, self.gpu, self.calls = mode, gpu, 0

  def __call__(self, tensor):
    i = self.calls
    self.calls += 1
    if self.mode == 'record':
      self.values.setdefault(self.gpu, []).append(tensor.detach().clone())
      return tensor
    per_gpu = [self.values[r][i] for r in sorted(self.values)]
    assert all(p.shape == tensor.shape for p in per_gpu)
    assert torch.equal(per_gpu[self.gpu], tensor.detach()), i
    return sum(p / len(per_gpu) for p in per_gpu).to(tensor.dtype)


def patch_reduce_mean(fake):
  n = 0
  for name, mod in list(sys.modules.items()):
    if name.startswith('mmdet.') and getattr(mod, 'reduce_mean', None) \
        is not None and name != 'mmdet.utils.dist_utils':
      mod.reduce_mean = fake
      n += 1
  return n


def capture_dn(model, store):
  gen = model.dn_query_generator
  call = type(gen).__call__

  def wrapped(self, samples):
    label_q, bbox_q, attn_mask, meta = call(self, samples)
    store['dn_num_groups'] = np.int64(meta['num_denoising_groups'])
    store['dn_num_queries'] = np.int64(meta['num_denoising_queries'])
    store['dn_attn_mask'] = attn_mask.numpy().copy()
    return label_q, bbox_q, attn_mask, meta
  type(gen).__call__ = wrapped


def build():
  from mmengine.config import Config
  from mmdet.registry import MODELS
  from mmdet.utils import register_all_modules
  register_all_modules()
  cfg = Config.fromfile(os.path.join(TINY, 'mmdet_config.py'))
  m = cfg.model
  m.dn_cfg.label_noise_scale = 1e-12
  m.dn_cfg.box_noise_scale = 1e-12
  model = MODELS.build(m)
  ckpt = torch.load(os.path.join(TINY, 'checkpoint.pth'), map_location='cpu',
                    weights_only=False)
  sd = ckpt.get('state_dict', ckpt)
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected, unexpected[:5]
  assert all(k.endswith('num_batches_tracked') for k in missing), missing[:5]
  pub = _published_recorder()
  import mmdet.models.detectors.ddq_detr as det_mod
  import mmdet.models.layers.transformer.ddq_detr_layers as layer_mod
  det_mod.batched_nms = pub.stable_batched_nms
  layer_mod.batched_nms = pub.stable_batched_nms
  return model


def main():
  torch.set_num_threads(2)
  import mmdet
  model = build()
  model.train()
  inputs, images = make_inputs()
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  fake = ReduceMean()
  assert patch_reduce_mean(fake) >= 3
  dn = {}
  capture_dn(model, dn)
  gpus = [list(range(r * PER_GPU, (r + 1) * PER_GPU))
          for r in range(len(IMG_SHAPES) // PER_GPU)]
  for r, rows in enumerate(gpus):
    fake.start('record', r)
    with torch.no_grad():
      model.loss(x[rows], data_samples(inputs, rows))
  out, grads = {}, []
  params = dict(model.named_parameters())
  for r, rows in enumerate(gpus):
    fake.start('mean', r)
    model.zero_grad()
    torch.manual_seed(0)
    losses = model.loss(x[rows], data_samples(inputs, rows))
    total = 0
    for k, v in losses.items():
      v = sum(v) if isinstance(v, (list, tuple)) else v
      out[f'gpu{r}/loss/{k}'] = np.float32(v.item())
      if 'loss' in k:
        total = total + v
    out[f'gpu{r}/loss_total'] = np.float32(total.item())
    total.backward()
    grads.append({k: p.grad.detach().clone() for k, p in params.items()
                  if p.requires_grad and p.grad is not None})
    for k, v in dn.items():
      out[f'gpu{r}/{k}'] = v
    print(f'gpu{r}: reduce_mean calls {fake.calls}, dn groups '
          f'{int(dn["dn_num_groups"])}, dn queries {int(dn["dn_num_queries"])}',
          flush=True)
  keys = sorted(k[len('gpu0/'):] for k in out if k.startswith('gpu0/loss'))
  for k in keys:
    out[k] = np.float32(np.mean([out[f'gpu{r}/{k}'] for r in range(len(gpus))]))
  mean = {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]}
  for name in GRADS:
    out[f'grad/{name}'] = mean[name].numpy()
  out['grad_global_norm'] = np.float32(torch.norm(torch.stack(
      [g.norm() for g in mean.values()])).item())
  np.savez_compressed(os.path.join(HERE, 'inputs.npz'), **inputs)
  np.savez_compressed(os.path.join(HERE, 'train.npz'), **out)
  with open(os.path.join(HERE, 'settings.json'), 'w') as f:
    json.dump(dict(images_seed=IMAGES_SEED, gt_seed=GT_SEED,
                   img_shapes=IMG_SHAPES, num_gts=NUM_GTS, per_gpu=PER_GPU,
                   dn_noise=1e-12, sort='stable', weights='../tiny/checkpoint.pth',
                   mmdet=mmdet.__version__, torch=torch.__version__), f,
              indent=1)
  print({k: float(v) for k, v in out.items()
         if np.size(v) == 1 and not k.startswith('gpu')}, flush=True)


if __name__ == '__main__':
  main()

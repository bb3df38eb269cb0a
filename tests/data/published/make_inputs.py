"""Write the published-size bundles' inputs (<variant>_coco/,
<variant>_empty/) and the initial weights the reference is run with.

    python tests/data/published/make_inputs.py --variant r50_4scale \
        --weights /tmp/init.npz

``inputs.npz`` holds everything but the images (``images_seed`` instead:
``verify.bundle_inputs`` draws them); ``init.json`` names the config and
the seed of ``init_variables``.  ``--weights`` writes those variables under
the reference's tensor names for ``record_reference.py``.
"""
import argparse
import json
import os

import numpy as np

# mmdetection's tests/data/coco_batched_sample.json (img_shape (h, w), the
# scale factor (w, h), labels and xyxy boxes in img_shape pixels).
SAMPLES = [
    dict(img_shape=(704, 929), scale_factor=(1.561344537815126,
                                             1.5609756097560976),
         labels=[67, 0, 10],
         bboxes=[[548.1207, 199.8158, 606.394, 383.5357],
                 [96.2335, 0.0, 929.0, 704.0],
                 [810.5372, 305.1872, 850.4097, 360.2198]]),
    dict(img_shape=(800, 1067), scale_factor=(1.6671875, 1.6666666666666667),
         labels=[0, 31],
         bboxes=[[61.1358, 44.95, 505.3245, 737.0833],
                 [57.5513, 706.5167, 631.2138, 751.4667]]),
]
CANVAS = (800, 1067)
HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {'r50_4scale': ('ddq_r50_4scale', 'state_dict_manifest_r50.json'),
            'r50_5scale': ('ddq_r50_5scale',
                           'state_dict_manifest_r50_5scale.json')}
NOISE = {'dn.label_noise_scale': 1e-12, 'dn.box_noise_scale': 1e-12}
MAX_GT = 4


def case_inputs(samples, image_seed):
  b = len(samples)
  pad = np.ones((b,) + CANVAS, bool)
  gt_boxes = np.zeros((b, MAX_GT, 4), np.float32)
  gt_labels = np.zeros((b, MAX_GT), np.int32)
  gt_valid = np.zeros((b, MAX_GT), bool)
  for i, s in enumerate(samples):
    h, w = s['img_shape']
    pad[i, :h, :w] = False
    n = len(s['labels'])
    gt_boxes[i, :n] = np.reshape(s['bboxes'], (n, 4))
    gt_labels[i, :n] = s['labels']
    gt_valid[i, :n] = True
  return dict(pad_mask=pad,
              img_shapes=np.array([s['img_shape'] for s in samples],
                                  np.int32),
              scale_factors=np.array([s['scale_factor'] for s in samples],
                                     np.float32),
              gt_boxes=gt_boxes, gt_labels=gt_labels, gt_valid=gt_valid,
              images_seed=np.int64(image_seed))


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--weights', help='write the initial weights (reference '
                 'names) to this .npz')
  p.add_argument('--image-seed', type=int, default=1)
  p.add_argument('--variant', choices=sorted(VARIANTS), default='r50_4scale')
  p.add_argument('--seed', type=int, default=0, help='init_variables seed')
  a = p.parse_args()
  config_name, manifest_name = VARIANTS[a.variant]
  init = dict(config=config_name, seed=a.seed, overrides=NOISE)
  empty = [dict(img_shape=CANVAS, scale_factor=(1.0, 1.0), labels=[],
                bboxes=[])]
  for name, samples in (('coco', SAMPLES), ('empty', empty)):
    d = os.path.join(HERE, f'{a.variant}_{name}')
    os.makedirs(d, exist_ok=True)
    np.savez_compressed(os.path.join(d, 'inputs.npz'),
                        **case_inputs(samples, a.image_seed))
    with open(os.path.join(d, 'init.json'), 'w') as f:
      json.dump(init, f, indent=1)
  if a.weights:
    from ddq_jax.io.conversion.export import to_reference_names
    from ddq_jax.parity.verify import init_weights
    variables, _ = init_weights(os.path.join(HERE, f'{a.variant}_coco',
                                             'init.json'))
    with open(os.path.join(HERE, '..', manifest_name)) as f:
      manifest = json.load(f)
    names = {k: len(v[0]) for k, v in manifest['tensors'].items()
             if not k.endswith('num_batches_tracked')}
    sd = to_reference_names(variables, names)
    np.savez(a.weights, **sd)
    print(f'wrote {len(sd)} tensors to {a.weights}')


if __name__ == '__main__':
  main()

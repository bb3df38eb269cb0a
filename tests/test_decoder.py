"""DDQ decoder + head against the golden fixture (decoder fed the
reference's own decoder inputs)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close
from ddq_jax.io.conversion.mapping import stack_layers, unstack_layers
from ddq_jax.model.decoder import DDQDecoder, coordinate_to_encoding, row0_of_inverted
from ddq_jax.model.head import DDQHead


class _DecoderAndHead(nn.Module):
  """decoder + bbox_head under the detector's names (tiny_variables apply)."""
  config: object
  semantics: str = 'row0'

  def setup(self):
    self.decoder = DDQDecoder.from_config(
        self.config, distinct_mask_semantics=self.semantics)
    self.bbox_head = DDQHead.from_config(self.config)

  def __call__(self, query, reference_points, memory, memory_mask,
               valid_ratios, spatial_shapes):
    out = self.decoder(
        query, value=memory, key_padding_mask=memory_mask,
        self_attn_mask=None, reference_points=reference_points,
        spatial_shapes=spatial_shapes, valid_ratios=valid_ratios,
        branches=self.bbox_head.decoder_branches())
    cls, box = self.bbox_head(out.hidden_states, out.references)
    return dict(vars(out), all_layers_cls_scores=cls,
                all_layers_bbox_preds=box)


def _run(config, variables, infer, semantics='row0'):
  model = _DecoderAndHead(config, semantics)
  v = {'params': {k: variables['params'][k] for k in ('decoder', 'bbox_head')}}
  shapes = tuple(tuple(int(x) for x in s) for s in infer['spatial_shapes'])
  fn = jax.jit(lambda v, *a: model.apply(v, *a, spatial_shapes=shapes))
  return jax.tree.map(np.asarray, fn(
      v, infer['decoder_query_in'], infer['decoder_reference_in'],
      infer['memory'], infer['memory_mask'], infer['valid_ratios']))


@pytest.fixture(scope='module')
def decoder_out(tiny_config, tiny_variables, tiny_infer):
  return _run(tiny_config, tiny_variables, tiny_infer)


def test_coordinate_to_encoding_order():
  c = jnp.asarray([[0.1, 0.2, 0.3, 0.4]])
  e = np.asarray(coordinate_to_encoding(c, num_feats=4))
  # y first: sin(0.2 * 2pi / 1), cos(0.2 * 2pi / 1), sin(0.2 * 2pi / 100) ...
  y = 0.2 * 2 * np.pi
  np.testing.assert_allclose(
      e[0, :4], [np.sin(y), np.cos(y), np.sin(y / 100), np.cos(y / 100)],
      rtol=1e-6)


def test_decoder_states_match_reference(decoder_out, tiny_infer):
  assert_close(decoder_out['hidden_states'], tiny_infer['hidden_states'],
               name='hidden_states')
  assert_close(decoder_out['references'], tiny_infer['references'],
               name='references')


def test_distinct_masks_identical(decoder_out, tiny_infer):
  for l in range(decoder_out['distinct_keep'].shape[0]):
    np.testing.assert_array_equal(decoder_out['distinct_keep'][l],
                                  tiny_infer[f'distinct_keep_{l}'])
    np.testing.assert_array_equal(decoder_out['head_query_mask'][l],
                                  tiny_infer[f'head_query_mask_{l}'])
  # The fixture exercises both branches of the row-0 quirk at layer 1
  # (layer 0 keeps all 30): image 0 keeps query 0, image 1 does not.
  keep1, head1 = tiny_infer['distinct_keep_1'], tiny_infer['head_query_mask_1']
  assert keep1[0, 0] and head1[0].all() and not keep1[0].all()
  assert not keep1[1, 0]
  np.testing.assert_array_equal(head1[1], keep1[1])


def test_head_outputs_match_reference(decoder_out, tiny_infer):
  assert_close(decoder_out['all_layers_cls_scores'],
               tiny_infer['all_layers_cls_scores'], name='cls')
  assert_close(decoder_out['all_layers_bbox_preds'],
               tiny_infer['all_layers_bbox_preds'], name='bbox')


def test_kept_set_semantics(tiny_config, tiny_variables, tiny_infer,
                            decoder_out):
  out = _run(tiny_config, tiny_variables, tiny_infer, 'kept_set')
  # With 3 layers only the head's reading of layer 1 changes: the states
  # and keep sets are the same; head_query_mask equals the kept set, which
  # differs from row 0 exactly for image 0 (query 0 kept) at layer 1.
  for k in ('hidden_states', 'references', 'distinct_keep',
            'all_layers_cls_scores', 'all_layers_bbox_preds'):
    np.testing.assert_array_equal(out[k], decoder_out[k], err_msg=k)
  np.testing.assert_array_equal(out['head_query_mask'], out['distinct_keep'])
  differs = out['head_query_mask'] != decoder_out['head_query_mask']
  expected = np.zeros_like(differs)
  expected[1, 0] = ~tiny_infer['distinct_keep_1'][0]
  np.testing.assert_array_equal(differs, expected)
  assert differs.sum() == 30 - 21


def test_kept_set_restricts_next_nms(tiny_config, tiny_variables, tiny_infer):
  """4 layers (layer 3 reuses layer 2's weights): layer 2's NMS runs over
  row 0 (all queries, image 0) or over the kept set."""
  cfg = tiny_config.copy_and_resolve_references()
  cfg.num_decoder_layers = 4
  v = unstack_layers(tiny_variables)  # torch's per-layer names
  dec = dict(v['params']['decoder'])
  dec['layers_3'] = dec['layers_2']
  head = dict(v['params']['bbox_head'])
  for name in ('cls_branches', 'reg_branches'):
    for i in range(3, 6):  # encoder/dense branches shift by one index
      for key in [k for k in v['params']['bbox_head']
                  if k == f'{name}_{i - 1}' or k.startswith(f'{name}_{i - 1}_')]:
        head[key.replace(f'{name}_{i - 1}', f'{name}_{i}', 1)] = (
            v['params']['bbox_head'][key])
    for key in [k for k in v['params']['bbox_head']  # unused, but stored
                if k == f'aux_{name}_2' or k.startswith(f'aux_{name}_2_')]:
      head[key.replace('_2', '_3', 1)] = v['params']['bbox_head'][key]
  params = dict(v['params'], decoder=dec, bbox_head=head)
  variables = stack_layers({'params': params})
  row0 = _run(cfg, variables, tiny_infer, 'row0')
  kept = _run(cfg, variables, tiny_infer, 'kept_set')
  # Layer 2's candidates: all (row0, image 0) vs the layer-1 kept set.
  assert not (kept['distinct_keep'][2, 0] & ~kept['distinct_keep'][1, 0]).any()
  assert not (kept['distinct_keep'][2, 1] & ~kept['distinct_keep'][1, 1]).any()
  assert not (row0['distinct_keep'][2, 1] & ~row0['distinct_keep'][1, 1]).any()
  # Image 0 (query 0 kept at layer 1): row 0 lets layer 2's NMS keep
  # queries that layer 1 dropped, and the layer-3 states differ.
  assert (row0['distinct_keep'][2, 0] & ~row0['distinct_keep'][1, 0]).any()
  assert row0['head_query_mask'][2, 0].all()
  np.testing.assert_array_equal(kept['head_query_mask'], kept['distinct_keep'])
  assert np.abs(row0['hidden_states'][3, 0] -
                kept['hidden_states'][3, 0]).max() > 1e-3
  np.testing.assert_array_equal(row0['hidden_states'][:3],
                                kept['hidden_states'][:3])
  # Image 1 (query 0 dropped): both semantics are the same.
  for k in ('distinct_keep', 'head_query_mask'):
    np.testing.assert_array_equal(row0[k][:, 1], kept[k][:, 1])
  np.testing.assert_array_equal(row0['hidden_states'][:, 1],
                                kept['hidden_states'][:, 1])


def test_row0_helper():
  keep = jnp.asarray([[True, False, True], [False, True, False]])
  np.testing.assert_array_equal(
      row0_of_inverted(keep), [[True, True, True], [False, True, False]])

"""The one naming rule between the reference's modules and our params tree.

Our Flax module tree mirrors the reference's torch module tree.  A torch
parameter name maps to a Flax path by a single rule: split on '.', and join
every numeric component onto the component before it with '_':

    encoder.layers.0.ffn.layers.0.0.weight -> encoder/layers_0/ffn/layers_0_0
    bbox_head.reg_branches.1.4.bias        -> bbox_head/reg_branches_1_4
    backbone.layer2.0.downsample.1.weight  -> backbone/layer2_0/downsample_1

The leaf name (kernel / scale / bias / mean / var / embedding) and the layout
change come from the declarative table in ``mapping.py``.
"""
from __future__ import annotations


def flax_module_path(torch_module_path: str) -> tuple[str, ...]:
  """'a.layers.0.ffn.layers.0.0' -> ('a', 'layers_0', 'ffn', 'layers_0_0')."""
  out: list[str] = []
  for part in torch_module_path.split('.') if torch_module_path else []:
    if part.isdigit() and out:
      out[-1] = f'{out[-1]}_{part}'
    else:
      out.append(part)
  return tuple(out)

"""Denoising (CDN) losses (mmdet ``DINOHead.loss_dn``), static shapes.

The assignment is fixed by the slot layout that ``models/denoising.py``
(``dn_layout``) computed for the forward pass and the detector handed over
in ``DetectorOutputs.denoising``: a slot in the used prefix reconstructs
ground-truth slot ``gt_index`` when ``positive``, else it is background.
The losses are then the one-to-one set losses of ``set_loss.py`` over the
used slots; ``criterion.py`` computes them in the same ``set_loss`` call as
the distinct queries'.
"""
from __future__ import annotations

import jax.numpy as jnp

from ddq_jax.model.outputs import DenoisingTargets


def dn_assignment(denoising: DenoisingTargets, *, lead):
  """The slots' fixed assignment for ``set_loss``.

  Args:
    denoising: the slots' targets (gt_index, positive (B, D); slot_in_range
      (D,)).
    lead: (L, B, D), the shape of the decoder layers' slot outputs.
  Returns:
    assigned (L, B, D) int, the gt slot (-1 = background); query_mask
    (L, B, D) bool, the used slots.
  """
  assigned = jnp.where(denoising.positive, denoising.gt_index, -1)
  return (jnp.broadcast_to(assigned, lead),
          jnp.broadcast_to(denoising.slot_in_range, lead))

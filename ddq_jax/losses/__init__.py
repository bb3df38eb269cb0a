"""ddq_jax.losses: DDQ-DETR's training losses, pure functions of the
detector's ``DetectorOutputs`` and the padded ground truth.

Read top-down:
  criterion.py    ddq_criterion: every term of the reference's loss dict
  config.py       CriterionConfig, read once from config.loss
  set_loss.py     one-to-one losses + the distinct queries' matching cost
  dn_loss.py      the denoising slots' fixed assignment (their losses: set_loss)
  dense_aux.py    the dense queries' 1-to-k auxiliary loss
  hungarian.py    exact assignment (scipy callback or pure JAX), 'auto'
  match_costs.py  the reference's matching costs
  basic.py        elementwise losses and the reference's averaging
"""

"""What a training run checks before it starts, and the exit codes it ends
with: the config's training fields (``check_train_config``), a resumed
workdir's stored config against the current one (``check_resume_config``),
and the exit code of each way a run ends (``exit_code_for``; ``train.py``
returns it, schedulers tell the cases apart).
"""
from __future__ import annotations

import logging
import signal

from ddq_jax.config import ConfigError, complete_config
from ddq_jax.train import checkpoint as ckpt_lib
from ddq_jax.train import integrity
from ddq_jax.train import nonfinite
from ddq_jax.train import workdir as workdir_lib
from ddq_jax.train.run_log import OutputWriteError

log = logging.getLogger('ddq_jax.train')

# Exit codes.
EXIT_PREEMPTED = 128 + signal.SIGTERM   # 143: SIGTERM, checkpoint saved
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: SIGINT, checkpoint saved
EXIT_CONFIG_MISMATCH = 2
EXIT_NONFINITE = 3
EXIT_CHECKPOINT = 4


class ConfigMismatchError(ValueError):
  """The resumed checkpoint was written with another config."""


class TrainConfigError(ValueError):
  """A config value training cannot run with (one line naming it)."""


class InitFromError(ValueError):
  """``train.init_from`` cannot be read or does not fit the model."""


def check_train_config(config) -> None:
  """Raises TrainConfigError naming the first field training cannot use."""
  t = config.train
  checks = (
      (int(t.max_steps) >= -1, 'train.max_steps',
       '-1 (epochs) or >= 0'),
      (int(t.global_batch_size) >= 1, 'train.global_batch_size', '>= 1'),
      (int(t.log_every) >= 1, 'train.log_every', '>= 1'),
      (int(t.checkpoint_every) >= 1, 'train.checkpoint_every',
       '>= 1'),
      (int(t.keep_checkpoints) >= 0, 'train.keep_checkpoints',
       '>= 0 (0 keeps all)'))
  for ok, key, want in checks:
    if not ok:
      value = t[key.split('.', 1)[1]]
      raise TrainConfigError(f'config field {key!r} is {value!r}; expected '
                             f'{want}')


def exit_code_for(error: BaseException | None = None,
                  result: dict | None = None) -> int | None:
  """train.py's exit code for a raised error or a returned result; None for
  an error this module does not know."""
  if error is not None:
    for cls, code in ((ConfigMismatchError, EXIT_CONFIG_MISMATCH),
                      (TrainConfigError, EXIT_CONFIG_MISMATCH),
                      (InitFromError, EXIT_CONFIG_MISMATCH),
                      (workdir_lib.WorkdirError, EXIT_CONFIG_MISMATCH),
                      (nonfinite.NonFiniteError, EXIT_NONFINITE),
                      (ckpt_lib.CheckpointError, EXIT_CHECKPOINT),
                      (OutputWriteError, EXIT_CHECKPOINT)):
      if isinstance(error, cls):
        return code
    return None
  if result and result.get('stopped'):
    return 128 + int(result.get('signal') or signal.SIGTERM)
  return 0



def check_resume_config(checkpointer: ckpt_lib.Checkpointer, config) -> None:
  """Raises ConfigMismatchError naming every key whose value differs from
  the config stored with the newest readable checkpoint (keys in
  integrity.RESUME_MAY_CHANGE and train.resume_may_change may differ)."""
  for step in sorted(checkpointer.all_steps(), reverse=True):
    try:
      saved = checkpointer.read_meta(step).get('config')
    except Exception:  # pylint: disable=broad-except
      continue  # damaged: restore_latest_good reports it
    if saved is None:
      return
    try:  # as every stored config: a field it lacks takes its default
      saved = integrity.config_to_dict(complete_config(saved))
    except ConfigError:
      pass  # a field this version does not know: compared as stored
    extra = tuple(config.train.resume_may_change)
    current = integrity.config_to_dict(config)
    diffs = integrity.config_differences(
        saved, current, may_change=integrity.RESUME_MAY_CHANGE + extra)
    other = integrity.config_keys_added_or_removed(saved, current)
    if other:
      log.warning('resume: %d config keys exist only in the checkpoint or '
                  'only now (not compared): %s', len(other),
                  ', '.join(other[:10]))
    if diffs:
      shown = '; '.join(f'{k}: {a!r} in the checkpoint, {b!r} now'
                        for k, a, b in diffs[:12])
      more = f' (and {len(diffs) - 12} more)' if len(diffs) > 12 else ''
      raise ConfigMismatchError(
          f'{checkpointer.directory} (step {step}) was written with another '
          f'config; {len(diffs)} keys differ: {shown}{more}.  Nothing was '
          'written.  Resume with the same config, use a new --workdir, or '
          'allow keys with --config.train.resume_may_change="(\'KEY\',)"')
    return

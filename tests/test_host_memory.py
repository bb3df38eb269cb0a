"""host_memory.keep_freed_memory: glibc malloc keeps freed pages."""
import argparse
import ctypes
import os
import subprocess
import sys

import pytest

from ddq_jax import cli, host_memory

PROBE = ('from ddq_jax import host_memory; '
         'print(host_memory.keep_freed_memory())')


def _probe(env_value):
  """keep_freed_memory()'s result in a fresh process."""
  env = dict(os.environ)
  env.pop(host_memory.ENV, None)
  if env_value is not None:
    env[host_memory.ENV] = env_value
  out = subprocess.run([sys.executable, '-c', PROBE], capture_output=True,
                       text=True, env=env, check=True)
  return out.stdout.strip()


def _glibc() -> bool:
  try:
    ctypes.CDLL(None).gnu_get_libc_version
  except (OSError, AttributeError):
    return False
  return True


@pytest.mark.skipif(not _glibc(), reason='glibc only')
def test_applies_on_glibc():
  assert _probe(None) == 'True'


def test_opt_out():
  assert _probe('0') == 'False'


def test_every_command_applies_it(monkeypatch):
  """cli.parse_args, where every command starts, calls it."""
  calls = []
  monkeypatch.setattr(host_memory, 'keep_freed_memory',
                      lambda: calls.append(1) or True)
  cli.parse_args(argparse.ArgumentParser(), [])
  assert calls == [1]

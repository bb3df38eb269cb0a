"""Reads PyTorch ``.pth`` checkpoints (zip format) without importing torch.

A torch zip checkpoint holds ``<root>/data.pkl`` (a pickle whose tensors are
persistent ids pointing at storages) and ``<root>/data/<key>`` (raw little
endian storage bytes).  We rebuild every tensor as a numpy array with a
restricted unpickler: only the handful of globals a state dict needs are
resolved; anything else (mmengine, numpy objects in ``meta``) becomes an
inert placeholder instead of being imported.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class CheckpointReadError(ValueError):
  """The file is not a readable PyTorch checkpoint."""


class _Opaque:
  """Stands in for any pickled object we refuse to import."""

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs = args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __call__(self, *args, **kwargs):
    return _Opaque(*args, **kwargs)

  def __repr__(self):
    return '<opaque pickled object>'


def _opaque_class(module: str, name: str):
  return type(name, (_Opaque,), {'__module__': module})


class _StorageType:

  def __init__(self, name: str):
    self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, offset, size, stride, *unused):
  array = storage
  if not size:
    return np.array(array[offset]).reshape(())
  itemsize = array.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      array[offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # own, contiguous copy


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, archive: zipfile.ZipFile, root: str):
    super().__init__(file)
    self._archive, self._root = archive, root
    self._storages = {}

  def find_class(self, module, name):
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_tensor_v2':
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == 'builtins' and name in ('set', 'frozenset', 'slice', 'dict',
                                         'list', 'tuple'):
      return getattr(__import__('builtins'), name)
    return _opaque_class(module, name)

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel = pid[:5]
    if kind != 'storage':
      raise CheckpointReadError(f'unsupported persistent id {kind!r}')
    if key not in self._storages:
      name = f'{self._root}/data/{key}'
      raw = self._archive.read(name)
      dtype = storage_type.dtype if isinstance(storage_type, _StorageType) \
          else np.float32
      self._storages[key] = np.frombuffer(raw, dtype=dtype)[:numel]
    return self._storages[key]


def load_torch_checkpoint(path: str) -> Any:
  """Returns the unpickled object of a torch zip checkpoint, tensors as numpy.

  Raises:
    CheckpointReadError: the file is missing, truncated, or not a torch zip
      checkpoint.
  """
  try:
    archive = zipfile.ZipFile(path)
  except FileNotFoundError:
    raise CheckpointReadError(f'{path}: no such file') from None
  except (zipfile.BadZipFile, OSError) as e:
    raise CheckpointReadError(
        f'{path}: not a PyTorch zip checkpoint (or truncated): {e}. Expected a '
        "file written by torch.save (torch >= 1.6, zip format).") from None
  with archive:
    pkls = [n for n in archive.namelist() if n.endswith('/data.pkl')]
    if not pkls:
      raise CheckpointReadError(f'{path}: zip archive without data.pkl; not a '
                                'PyTorch checkpoint')
    root = pkls[0][:-len('/data.pkl')]
    try:
      return _Unpickler(io.BytesIO(archive.read(pkls[0])), archive,
                        root).load()
    except CheckpointReadError:
      raise
    except Exception as e:  # truncated data, bad pickle, missing storage
      raise CheckpointReadError(
          f'{path}: could not read the checkpoint ({type(e).__name__}: {e}); '
          'the file may be truncated or corrupt') from None


def state_dict_of(obj: Any, path: str = '<checkpoint>') -> dict[str, np.ndarray]:
  """The tensor dict of a loaded checkpoint (mmengine's or a bare state dict)."""
  if isinstance(obj, dict) and 'state_dict' in obj:
    obj = obj['state_dict']
  elif isinstance(obj, dict) and 'model' in obj and isinstance(obj['model'], dict):
    obj = obj['model']
  if not isinstance(obj, dict) or not all(
      isinstance(v, np.ndarray) for v in obj.values()):
    raise CheckpointReadError(f'{path}: holds no state dict of tensors')
  return dict(obj)

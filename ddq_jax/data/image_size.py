"""(height, width) of an image file from its header, without decoding it.

PNG (IHDR) and JPEG (the first SOF marker) are read from a few hundred
bytes; anything else is decoded with OpenCV (``transforms.read_image``).
"""
from __future__ import annotations

import struct

from ddq_jax.data.transforms import read_image

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# JPEG start-of-frame markers (C4 DHT, C8 JPG, CC DAC are not frames).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
        0xCE, 0xCF}


def _jpeg_size(f) -> tuple[int, int] | None:
  f.seek(2)
  while True:
    b = f.read(1)
    while b and b != b'\xff':
      b = f.read(1)
    while b == b'\xff':
      b = f.read(1)
    if not b:
      return None
    marker = b[0]
    if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
      continue  # no length field
    raw = f.read(2)
    if len(raw) < 2:
      return None
    length = struct.unpack('>H', raw)[0]
    if marker == 0xE1:  # EXIF may rotate the decoded image: decode instead
      if f.read(4) == b'Exif':
        return None
      f.seek(length - 6, 1)
      continue
    if marker in _SOF:
      data = f.read(5)
      if len(data) < 5:
        return None
      h, w = struct.unpack('>HH', data[1:5])
      return int(h), int(w)
    f.seek(length - 2, 1)


def image_size(path: str) -> tuple[int, int] | None:
  """(h, w) of the image at ``path``, or None if it is missing / unreadable.

  JPEGs with EXIF data are decoded (OpenCV applies the EXIF orientation,
  as the loaders do), so the size is the decoded one.
  """
  try:
    with open(path, 'rb') as f:
      head = f.read(26)
      if head.startswith(_PNG_MAGIC) and head[12:16] == b'IHDR':
        w, h = struct.unpack('>II', head[16:24])
        return int(h), int(w)
      if head.startswith(b'\xff\xd8'):
        size = _jpeg_size(f)
        if size is not None and min(size) > 0:
          return size
  except OSError:
    return None
  image = read_image(path)
  return None if image is None else tuple(int(v) for v in image.shape[:2])

"""Reading image files into HxWx3 uint8 RGB frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .preprocess import Frame


def load_image(path: Path | str) -> Frame:
    """Decode an image file (any format Pillow reads) as an RGB frame, upright.

    A phone photo stores its pixels as the sensor saw them and says in its EXIF
    orientation tag how to turn them; the frame is turned that way, as a viewer does.
    """
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such image file", hint="check the path") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(
            f"{path}: cannot read as an image ({exc})",
            hint="pass a JPEG, PNG or BMP file",
        ) from exc

"""Image decoding and CLIP preprocessing with Pillow + torch (torchvision is not required).

Every odd input either becomes an RGB image or raises :class:`ImageError` naming the problem:
zero-byte and truncated files, unknown formats, decompression bombs (Pillow's guard stays on),
grayscale / palette / RGBA / CMYK / 16-bit modes (converted).
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dpal_core.errors import ImageError

# CLIP's published normalisation (OpenAI), used when a model folder gives none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


def load_image(source: bytes | str | Path, *, max_pixels: int | None = None, name: str = "") -> Image.Image:
    """Decode ``source`` (raw bytes or a file path) into an RGB :class:`PIL.Image.Image`.

    Args:
        source: encoded image bytes, or a path to an image file.
        max_pixels: refuse images with more pixels than this (default: Pillow's own bomb limit).
        name: how to refer to the image in error messages (a URL or file name).
    Raises:
        ImageError: empty, truncated, unreadable, or too large.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else "image")
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageError(f"cannot read image file {label}: {exc.strerror or exc}") from None
    else:
        data = bytes(source)
    if not data:
        raise ImageError(f"image {label} is empty (0 bytes)")
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; treat that as the error it is here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if limit is not None and img.width * img.height > limit:
                raise ImageError(
                    f"image {label} is {img.width}x{img.height} pixels, over the limit of {limit} pixels"
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {label} refused as a decompression bomb: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"image {label} is not a recognised image format ({len(data)} bytes)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image {label} is corrupt or truncated: {exc}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: scale the actual range to 0..255 instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImagePreprocessor:
    """CLIP preprocessing: resize the short side (bicubic), centre-crop, scale to [0,1], normalise."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """Returns pixel values, shape [B, 3, size, size], float32."""
        if not images:
            return torch.empty(0, 3, self.size, self.size)
        arrays = [self._one(to_rgb(im)) for im in images]
        batch = torch.from_numpy(np.stack(arrays))  # [B, H, W, 3] uint8
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def _one(self, img: Image.Image) -> np.ndarray:
        w, h = img.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        return np.asarray(img, dtype=np.uint8)

    @classmethod
    def from_folder(cls, folder: Path, default_size: int) -> ImagePreprocessor:
        """Read a Hugging Face ``preprocessor_config.json`` if the folder has one."""
        path = Path(folder) / PREPROCESSOR_FILE
        if not path.is_file():
            return cls(size=default_size)
        cfg = json.loads(path.read_text())
        crop = cfg.get("crop_size", default_size)
        size = crop.get("height", default_size) if isinstance(crop, dict) else int(crop)
        return cls(
            size=int(size),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
        )


def write_preprocessor_config(folder: Path, size: int) -> None:
    """Write a CLIPImageProcessor-compatible config so other tools can read the folder too."""
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
        "resample": 3,
    }
    (Path(folder) / PREPROCESSOR_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))

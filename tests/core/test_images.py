import io

import numpy as np
import pytest
from PIL import Image

from dpal_core.errors import ImageError
from dpal_core.images import ImagePreprocessor, load_image


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_zero_byte_image():
    with pytest.raises(ImageError, match="empty"):
        load_image(b"", name="empty.png")


def test_truncated_image():
    data = _encode(Image.new("RGB", (64, 64), "red"), "JPEG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2], name="half.jpg")


def test_not_an_image():
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(b"<html>login page</html>", name="x")


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "nope.png")


@pytest.mark.parametrize(
    "img",
    [
        Image.new("L", (10, 8), 128),
        Image.new("RGBA", (10, 8), (255, 0, 0, 0)),
        Image.new("P", (10, 8)),
        Image.new("CMYK", (10, 8)),
        Image.new("1", (10, 8)),
        Image.fromarray((np.arange(80).reshape(8, 10) * 800).astype(np.uint16)),
    ],
    ids=["L", "RGBA", "P", "CMYK", "1", "I;16"],
)
def test_modes_are_converted_to_rgb(img):
    fmt = "TIFF" if img.mode == "CMYK" else "PNG"
    out = load_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (10, 8)


def test_transparent_pixels_become_white():
    out = load_image(_encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_range_is_scaled_not_clipped():
    arr = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)
    out = np.asarray(load_image(_encode(Image.fromarray(arr))))
    assert out.min() == 0 and out.max() == 255


def test_pixel_limit_is_enforced():
    data = _encode(Image.new("1", (3000, 3000)))
    with pytest.raises(ImageError, match="over the limit"):
        load_image(data, max_pixels=1_000_000)


def test_pillow_decompression_bomb_guard_stays_on():
    side = int((Image.MAX_IMAGE_PIXELS * 1.2) ** 0.5)  # between 1x and 2x: Pillow only warns
    data = _encode(Image.new("1", (side, side)))
    with pytest.raises(ImageError):
        load_image(data)


def test_preprocess_resizes_and_crops_any_aspect():
    pre = ImagePreprocessor(size=32)
    out = pre([Image.new("RGB", (300, 20), "white"), Image.new("RGB", (5, 7), "black")])
    assert out.shape == (2, 3, 32, 32)
    assert out.dtype.is_floating_point

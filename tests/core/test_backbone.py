import subprocess
import sys

import pytest
import torch
from PIL import Image

from dpal_core.backbone import encode_images, encode_pil, encode_texts, load_backbone
from dpal_core.errors import BackboneUnavailableError


def test_tiny_model_cli_writes_a_loadable_clip(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "backend.cli", "tiny-model", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "tiny random CLIP" in out.stdout
    bb = load_backbone(str(tmp_path / "m"), device="cpu")
    assert bb.embed_dim == 32
    assert bb.backbone_id.startswith("local:m@")


def test_encode_shapes_and_normalize_flag(backbone):
    imgs = [Image.new("RGB", (40, 30), c) for c in ("red", "green", "blue")]
    pixels = backbone.preprocess(imgs)
    assert pixels.shape == (3, 3, 32, 32)
    raw = encode_images(backbone, pixels, normalize=False)
    unit = encode_images(backbone, pixels, normalize=True)
    assert raw.shape == unit.shape == (3, backbone.embed_dim)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3), atol=1e-3)
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), unit, atol=1e-6)
    # Batching must not change results.
    assert torch.allclose(encode_pil(backbone, imgs, batch_size=2), unit, atol=1e-5)
    assert encode_texts(backbone, ["a photo of a cat."]).shape == (1, backbone.embed_dim)


def test_backbone_is_frozen(backbone):
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_offline_hub_id_gives_a_clear_error():
    with pytest.raises(BackboneUnavailableError) as err:
        load_backbone("no-such-org/no-such-clip", device="cpu")
    msg = str(err.value)
    assert "no-such-org/no-such-clip" in msg
    assert "DPAL_MODEL" in msg and "local folder" in msg


def test_folder_that_is_not_a_clip_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(BackboneUnavailableError):
        load_backbone(str(tmp_path), device="cpu")

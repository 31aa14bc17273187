"""Fixtures for server tests: image folders, label configs, settings built from a dict."""

from __future__ import annotations

import pytest
from PIL import Image

from backend.settings import Settings

ANIMAL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="animal" toName="image" choice="single-radio">
    <Choice value="Bear"/>
    <Choice value="Cat"/>
    <Choice value="Dog" predicted_values="dog"/>
  </Choices>
</View>
"""

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250)}


@pytest.fixture()
def image_root(tmp_path):
    """A LOCAL_FILES_DOCUMENT_ROOT with a few PNGs and some broken files."""
    root = tmp_path / "media"
    (root / "imgs").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 40), rgb).save(root / "imgs" / f"{name}.png")
    (root / "imgs" / "empty.png").write_bytes(b"")
    (root / "imgs" / "truncated.png").write_bytes((root / "imgs" / "red.png").read_bytes()[:40])
    (tmp_path / "secret.png").write_bytes((root / "imgs" / "red.png").read_bytes())
    return root


def local_task(task_id: int, rel: str) -> dict:
    return {"id": task_id, "data": {"image": f"/data/local-files/?d={rel}"}}


@pytest.fixture()
def make_settings(tmp_path, tiny_clip_dir, image_root):
    def make(**overrides: str) -> Settings:
        env = {
            "LABEL_STUDIO_URL": "http://127.0.0.1:1",  # nothing listens: no test reaches it by accident
            "LABEL_STUDIO_API_KEY": "test-secret-key-0123456789",
            "DPAL_MODEL": str(tiny_clip_dir),
            "MODEL_DIR": str(tmp_path / "models"),
            "LOCAL_FILES_DOCUMENT_ROOT": str(image_root),
            "DPAL_DEVICE": "cpu",
        }
        env.update(overrides)
        return Settings.from_env(env)

    return make

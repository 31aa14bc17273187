import json

import pytest
import torch

from dpal_core.backbone import load_backbone
from dpal_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint
from dpal_core.config import PromptConfig, TrainConfig
from dpal_core.errors import CheckpointError
from dpal_core.model import DualPromptCLIP, predict
from dpal_core.tiny import build_tiny_clip
from dpal_core.train import TrainData, train

NAMES = ["bear", "cat", "dog"]


@pytest.mark.parametrize("paradigm", ["coop", "adapter", "vpt"])
def test_round_trip_gives_identical_predictions(backbone, tmp_path, paradigm):
    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4, paradigm=paradigm, class_specific=True))
    feats = torch.nn.functional.normalize(torch.randn(20, backbone.embed_dim), dim=-1)
    pixels = torch.randn(20, 3, 32, 32)
    labels = torch.randint(0, 3, (20,))
    data = TrainData(labels, pixel_values=pixels) if paradigm == "vpt" else TrainData(labels, features=feats)
    train(model, data, TrainConfig(epochs=2, progress=False, optimizer="adamw", lr=0.01))
    path = save_checkpoint(model, tmp_path / "v1", metadata={"accuracy": 0.5})
    assert sorted(p.name for p in path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    loaded = load_checkpoint(path, backbone, NAMES)
    kw = dict(pixel_values=pixels) if paradigm == "vpt" else dict(features=feats)
    a, b = predict(model, **kw), predict(loaded, **kw)
    assert torch.equal(a.pred, b.pred) and torch.equal(a.p_clean, b.p_clean)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    assert cfg["metadata"] == {"accuracy": 0.5} and cfg["class_names"] == NAMES


def test_only_learned_tensors_are_saved(backbone, tmp_path):
    from safetensors.torch import load_file

    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4, paradigm="adapter"))
    path = save_checkpoint(model, tmp_path / "v")
    assert set(load_file(str(path / WEIGHTS_FILE))) == {
        "prompt_pos.ctx",
        "prompt_neg.ctx",
        "visual.mlp.0.weight",
        "visual.mlp.2.weight",
    }


def test_mismatched_class_names_are_refused(backbone, tmp_path):
    path = save_checkpoint(DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4)), tmp_path / "v")
    with pytest.raises(CheckpointError, match="label config changed"):
        load_checkpoint(path, backbone, ["bear", "cat", "cow"])
    with pytest.raises(CheckpointError, match="label config changed"):
        load_checkpoint(path, backbone, ["cat", "bear", "dog"])  # order matters: indices are labels


def test_mismatched_backbone_is_refused(backbone, tmp_path):
    path = save_checkpoint(DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4)), tmp_path / "v")
    other_dir, _ = build_tiny_clip(tmp_path / "other-clip", seed=1)
    other = load_backbone(str(other_dir), device="cpu")
    assert other.backbone_id != backbone.backbone_id
    with pytest.raises(CheckpointError, match="trained on backbone"):
        load_checkpoint(path, other, NAMES)


def test_existing_version_is_never_overwritten_by_accident(backbone, tmp_path):
    model = DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4))
    save_checkpoint(model, tmp_path / "v")
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(model, tmp_path / "v")
    save_checkpoint(model, tmp_path / "v", overwrite=True)


def test_incomplete_or_foreign_folders_are_refused(backbone, tmp_path):
    with pytest.raises(CheckpointError, match="not a dpal checkpoint"):
        load_checkpoint(tmp_path, backbone)
    path = save_checkpoint(DualPromptCLIP(backbone, NAMES, PromptConfig(n_ctx=4)), tmp_path / "v")
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path, backbone)

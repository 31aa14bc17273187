"""Save and load only what learns: prompts + visual tuner (safetensors) and a JSON config.

Writes are atomic: files go to a temporary sibling folder that is renamed into place, so a reader
(or a crash) never sees half a checkpoint. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from dpal_core.backbone import Backbone
from dpal_core.config import PromptConfig
from dpal_core.errors import CheckpointError
from dpal_core.model import DualPromptCLIP

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "dpal_config.json"
FORMAT_VERSION = 1
_LEARNED_PREFIXES = ("prompt_pos.", "prompt_neg.", "visual.")


def learned_state(model: DualPromptCLIP) -> dict[str, Any]:
    """The trainable tensors only (no backbone, no frozen token buffers)."""
    return {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(_LEARNED_PREFIXES)
    }


def save_checkpoint(
    model: DualPromptCLIP,
    directory: str | Path,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s learned parts to ``directory`` atomically.

    Args:
        metadata: extra JSON-serialisable facts stored in the config (metrics, training set size...).
        overwrite: replace an existing checkpoint; otherwise an existing folder is an error.
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise CheckpointError(f"checkpoint folder {target} already exists; versions are never overwritten")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(learned_state(model), str(tmp / WEIGHTS_FILE))
        config = {
            "format_version": FORMAT_VERSION,
            "backbone_id": model.backbone_id,
            "class_names": list(model.class_names),
            "prompt_config": model.config.to_dict(),
            "metadata": metadata or {},
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    """The JSON config of a checkpoint, validated for presence and format."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file() or not (Path(directory) / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{directory} is not a dpal checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {config.get('format_version')!r}")
    return config


def load_checkpoint(
    directory: str | Path, backbone: Backbone, class_names: Sequence[str] | None = None
) -> DualPromptCLIP:
    """Rebuild a :class:`DualPromptCLIP` on ``backbone`` from a checkpoint.

    Raises:
        CheckpointError: missing files, another backbone, or class names that differ from
            ``class_names`` (when given) — a checkpoint is only valid for the classes it learnt.
    """
    config = read_checkpoint_config(directory)
    if config["backbone_id"] != backbone.backbone_id:
        raise CheckpointError(
            f"checkpoint {directory} was trained on backbone {config['backbone_id']!r}, "
            f"but the loaded backbone is {backbone.backbone_id!r}; retrain or load the matching backbone"
        )
    saved = list(config["class_names"])
    if class_names is not None and list(class_names) != saved:
        raise CheckpointError(
            f"checkpoint {directory} has classes {saved}, but {list(class_names)} were asked for; "
            "the label config changed, so this checkpoint cannot be used"
        )
    model = DualPromptCLIP(backbone, saved, PromptConfig.from_dict(config["prompt_config"]))
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE), device=str(backbone.device))
    expected = set(learned_state(model))
    if set(tensors) != expected:
        raise CheckpointError(
            f"checkpoint {directory} holds tensors {sorted(tensors)} but the model expects {sorted(expected)}"
        )
    model.load_state_dict(tensors, strict=False)
    model.eval()
    return model

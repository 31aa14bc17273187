"""One loader for the frozen CLIP backbone: model, image preprocessing and tokenizer.

Works with a Hugging Face id (downloaded on the user's machine, cached by ``huggingface_hub``) or
a local folder (offline machines, tests, the proxy backbone).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from dpal_core.errors import BackboneUnavailableError
from dpal_core.images import ImagePreprocessor

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"


@dataclass(frozen=True, eq=False)
class Backbone:
    """A frozen CLIP with what is needed to feed it."""

    model: CLIPModel
    tokenizer: PreTrainedTokenizerBase
    preprocess: ImagePreprocessor
    backbone_id: str  # stable identity: hub id, or folder name + content fingerprint

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def _fingerprint(folder: Path) -> str:
    """Cheap, stable identity of a local model folder: config + weight sizes + first MiB of weights."""
    h = hashlib.sha256()
    for f in (
        sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    ):
        h.update(f.name.encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:12]


def backbone_identity(name_or_path: str) -> str:
    """The id under which checkpoints and cached embeddings of this backbone are filed."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return f"local:{path.resolve().name}@{_fingerprint(path)}"
    return name_or_path


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, device: str | torch.device | None = None) -> Backbone:
    """Load a frozen CLIP backbone.

    Args:
        name_or_path: Hugging Face CLIP id (e.g. ``openai/clip-vit-base-patch16``) or a local folder.
        device: where to put the model (default: CUDA when available, else CPU).
    Raises:
        BackboneUnavailableError: the weights cannot be had, with what to do about it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(name_or_path).expanduser()
    source = str(path) if path.is_dir() else name_or_path
    if (
        path.suffix
        and not path.exists()
        and ("/" in name_or_path and name_or_path.startswith((".", "/", "~")))
    ):
        raise BackboneUnavailableError(f"CLIP backbone folder '{name_or_path}' does not exist.")
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists unused heads; it is noise here
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every start
    try:
        model = CLIPModel.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise BackboneUnavailableError(
            f"cannot load CLIP backbone '{name_or_path}': {str(exc).splitlines()[0]} "
            "If this machine is offline, download the model on a connected machine "
            "(huggingface-cli download <id>) and set DPAL_MODEL to its local folder."
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if not isinstance(model, CLIPModel):
        raise BackboneUnavailableError(f"'{name_or_path}' is not a CLIP model")
    model.requires_grad_(False).eval().to(device)
    image_size = int(model.config.vision_config.image_size)
    preprocess = ImagePreprocessor.from_folder(path if path.is_dir() else Path("/nonexistent"), image_size)
    if not path.is_dir():
        preprocess = _hub_preprocessor(name_or_path, image_size)
    return Backbone(model, tokenizer, preprocess, backbone_identity(name_or_path))


def _hub_preprocessor(name: str, image_size: int) -> ImagePreprocessor:
    try:
        from huggingface_hub import hf_hub_download

        cfg = hf_hub_download(name, "preprocessor_config.json")
        return ImagePreprocessor.from_folder(Path(cfg).parent, image_size)
    except Exception:  # noqa: BLE001 - the CLIP defaults are right for every OpenAI checkpoint
        return ImagePreprocessor(size=image_size)


@torch.no_grad()
def encode_images(backbone: Backbone, pixel_values: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Image embeddings ``E_I(x)``.

    Args:
        pixel_values: [B, 3, S, S] from ``backbone.preprocess``.
        normalize: L2-normalise the result.
    Returns:
        [B, D] float32 on the backbone's device.
    """
    out = backbone.model.get_image_features(pixel_values=pixel_values.to(backbone.device))
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = feats.float()
    return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats


def encode_pil(
    backbone: Backbone, images: Sequence[Image.Image], batch_size: int = 64, normalize: bool = True
) -> torch.Tensor:
    """Preprocess and encode PIL images in batches. Returns [N, D] float32 on CPU."""
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = backbone.preprocess(list(images[start : start + batch_size]))
        chunks.append(encode_images(backbone, pixels, normalize=normalize).cpu())
    if not chunks:
        return torch.empty(0, backbone.embed_dim)
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(backbone: Backbone, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
    """Text embeddings ``E_T(text)`` for plain (hand-written) prompts. Returns [N, D] float32."""
    tok = backbone.tokenizer(
        list(texts),
        padding="max_length",
        truncation=True,
        max_length=backbone.model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    )
    out = backbone.model.get_text_features(
        input_ids=tok["input_ids"].to(backbone.device),
        attention_mask=tok["attention_mask"].to(backbone.device),
    )
    feats = (out.pooler_output if hasattr(out, "pooler_output") else out).float()
    return torch.nn.functional.normalize(feats, dim=-1) if normalize else feats

"""Model versions per Label Studio project, on disk under ``MODEL_DIR``.

Layout::

    MODEL_DIR/projects/<project>/versions/<n>/   a dpal_core checkpoint (+ metrics in its config)
    MODEL_DIR/projects/<project>/current.json    {"version": n}, replaced atomically

Version 0 is the zero-shot model and has no folder. A version folder appears whole (the checkpoint
is written to a temp folder and renamed) and the pointer is switched afterwards with ``os.replace``,
so a reader sees either the old or the new version, never half of one; a crash between the two
leaves an unpublished folder that the next publish skips over.

The served ``model_version`` string is ``dpal-v<n>-<tag>``; ``tag`` hashes the backbone and the
class names, so a changed label config or backbone can never be confused with older predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpal_core.checkpoint import read_checkpoint_config, save_checkpoint
from dpal_core.model import DualPromptCLIP

_PROJECT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class StoreError(ValueError):
    """A project id or version that the store cannot use."""


def project_key(project: Any) -> str:
    """Normalise Label Studio's project field ("12.1712345678", 12, "12") to "12"."""
    text = str(project).strip()
    key = text.split(".", 1)[0] if text else ""
    if not _PROJECT_RE.match(key):
        raise StoreError(f"project id {text!r} is not valid (expected Label Studio's numeric project id)")
    return key


def version_tag(backbone_id: str, class_names: tuple[str, ...] | list[str]) -> str:
    payload = json.dumps([backbone_id, list(class_names)], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:8]


def version_string(version: int, backbone_id: str, class_names: tuple[str, ...] | list[str]) -> str:
    return f"dpal-v{version}-{version_tag(backbone_id, class_names)}"


@dataclass(frozen=True)
class VersionInfo:
    project: str
    version: int  # 0 = zero-shot
    path: Path | None  # checkpoint folder, None for version 0
    class_names: tuple[str, ...]
    backbone_id: str
    metrics: dict[str, Any]

    @property
    def model_version(self) -> str:
        return version_string(self.version, self.backbone_id, self.class_names)


class ModelStore:
    """Reads and publishes versions. Safe to share between processes (server, workers)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def project_dir(self, project: Any) -> Path:
        return self.root / "projects" / project_key(project)

    def current_version(self, project: Any) -> int:
        """The published version number (0 when nothing was published)."""
        pointer = self.project_dir(project) / "current.json"
        try:
            return int(json.loads(pointer.read_text())["version"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"{pointer} is corrupt ({exc}); fix or delete it to serve version 0") from None

    def pointer_stamp(self, project: Any) -> tuple[int, int] | None:
        """A cheap change detector for the current pointer (inode, mtime_ns), None when absent."""
        try:
            st = (self.project_dir(project) / "current.json").stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def version_info(
        self, project: Any, version: int, backbone_id: str, class_names: tuple[str, ...]
    ) -> VersionInfo:
        """Describe ``version``; version 0 takes the caller's backbone and class names."""
        key = project_key(project)
        if version == 0:
            return VersionInfo(key, 0, None, tuple(class_names), backbone_id, {})
        path = self.project_dir(key) / "versions" / str(version)
        cfg = read_checkpoint_config(path)
        return VersionInfo(
            key,
            version,
            path,
            tuple(cfg["class_names"]),
            cfg["backbone_id"],
            cfg.get("metadata", {}).get("metrics", {}),
        )

    def current(self, project: Any, backbone_id: str, class_names: tuple[str, ...]) -> VersionInfo:
        """The version to serve for these class names and backbone.

        A published version trained for other classes or another backbone is not served: the
        zero-shot version 0 for the current config is, until a retrain publishes a matching one.
        """
        info = self.version_info(project, self.current_version(project), backbone_id, class_names)
        if info.version and (info.class_names != tuple(class_names) or info.backbone_id != backbone_id):
            return self.version_info(project, 0, backbone_id, class_names)
        return info

    def versions(self, project: Any) -> list[int]:
        vdir = self.project_dir(project) / "versions"
        if not vdir.is_dir():
            return []
        return sorted(int(p.name) for p in vdir.iterdir() if p.name.isdigit())

    def publish(self, project: Any, model: DualPromptCLIP, metadata: dict[str, Any]) -> VersionInfo:
        """Write ``model`` as the next version and point ``current`` at it (both atomic)."""
        key = project_key(project)
        vdir = self.project_dir(key) / "versions"
        vdir.mkdir(parents=True, exist_ok=True)
        number = max(self.versions(key) + [self.current_version(key)]) + 1
        save_checkpoint(model, vdir / str(number), metadata=metadata)
        self._write_pointer(key, number)
        return self.version_info(key, number, model.backbone_id, model.class_names)

    def _write_pointer(self, key: str, number: int) -> None:
        pdir = self.project_dir(key)
        fd, tmp = tempfile.mkstemp(prefix=".current-", dir=pdir)
        with os.fdopen(fd, "w") as fh:
            json.dump({"version": number}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, pdir / "current.json")

    def projects(self) -> list[str]:
        pdir = self.root / "projects"
        return sorted(p.name for p in pdir.iterdir() if p.is_dir()) if pdir.is_dir() else []

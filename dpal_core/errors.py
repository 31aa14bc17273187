"""Errors the core raises. Each message says what is wrong and how to fix it.

The server maps these to HTTP codes in one place (``backend.errors``); nothing here knows HTTP.
"""

from __future__ import annotations


class DpalError(Exception):
    """Base class for every error dpal_core raises on purpose."""


class ClassNamesError(DpalError, ValueError):
    """The list of class names is unusable (empty, one class, duplicates, blank names)."""


class ImageError(DpalError, ValueError):
    """An image could not be decoded or is not acceptable (corrupt, empty, too large)."""


class EmbeddingError(DpalError, ValueError):
    """Image embeddings are malformed (wrong shape, NaN or infinite values)."""


class BackboneUnavailableError(DpalError, RuntimeError):
    """The CLIP backbone cannot be loaded (offline, wrong id, not a CLIP model)."""


class CheckpointError(DpalError, ValueError):
    """A checkpoint is missing, incomplete, or does not match the backbone or class names."""


class ConfigError(DpalError, ValueError):
    """A configuration value is out of range or unknown."""

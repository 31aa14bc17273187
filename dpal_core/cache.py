"""On-disk store of image embeddings, keyed by (backbone id, image identity).

Layout per backbone: ``<root>/<backbone key>/vectors.f32`` (append-only rows of D float32) and
``index.sqlite`` (key -> row). A pool of 1M x 512 embeddings is 2 GB on disk but only the rows asked
for are read (memory-mapped). Several processes (server, workers) may share one cache: appends take
an exclusive file lock, and a row is indexed only after its bytes are written, so a crash leaves at
worst unreferenced bytes, never a key pointing at garbage.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dpal_core.errors import EmbeddingError

_SQL_CHUNK = 900  # below SQLite's default limit on bound parameters


def _backbone_dir(backbone_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", backbone_id)[:60]
    return f"{safe}-{hashlib.sha256(backbone_id.encode()).hexdigest()[:8]}"


class EmbeddingCache:
    """Embeddings of one backbone. Keys are caller-chosen image identities (URL, path, hash)."""

    def __init__(self, root: str | Path, backbone_id: str, dim: int) -> None:
        self.dir = Path(root) / _backbone_dir(backbone_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim = int(dim)
        self.backbone_id = backbone_id
        self._vectors = self.dir / "vectors.f32"
        self._lock = self.dir / "write.lock"
        self._vectors.touch(exist_ok=True)
        self._db = sqlite3.connect(self.dir / "index.sqlite", timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS idx (key TEXT PRIMARY KEY, row INTEGER NOT NULL)")
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('dim', ?), ('backbone', ?)", (self.dim, backbone_id)
            )
        stored = int(self._db.execute("SELECT v FROM meta WHERE k='dim'").fetchone()[0])
        if stored != self.dim:
            raise EmbeddingError(f"embedding cache {self.dir} holds {stored}-d vectors, not {self.dim}-d")

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM idx").fetchone()[0])

    def __contains__(self, key: str) -> bool:
        return self._db.execute("SELECT 1 FROM idx WHERE key=?", (key,)).fetchone() is not None

    def rows(self, keys: Sequence[str]) -> list[int | None]:
        """Row of each key, or None when not cached."""
        found: dict[str, int] = {}
        for i in range(0, len(keys), _SQL_CHUNK):
            chunk = list(keys[i : i + _SQL_CHUNK])
            marks = ",".join("?" * len(chunk))
            found.update(
                self._db.execute(f"SELECT key, row FROM idx WHERE key IN ({marks})", chunk).fetchall()
            )
        return [found.get(k) for k in keys]

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Cached vectors for ``keys``.

        Returns:
            vectors [N, D] float32 (zeros where missing) and a boolean mask [N] of which were found.
        """
        rows = self.rows(keys)
        mask = np.array([r is not None for r in rows], dtype=bool)
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        if mask.any():
            size = self._vectors.stat().st_size // (4 * self.dim)
            mm = np.memmap(self._vectors, dtype=np.float32, mode="r", shape=(size, self.dim))
            idx = np.array([r for r in rows if r is not None], dtype=np.int64)
            order = np.argsort(idx)  # sequential reads are much faster on disk
            out_rows = np.flatnonzero(mask)[order]
            out[out_rows] = mm[idx[order]]
            del mm
        return out, mask

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store ``vectors`` [N, D] under ``keys``; keys already cached keep their first vector."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(keys), self.dim):
            raise EmbeddingError(
                f"expected vectors of shape [{len(keys)}, {self.dim}], got {list(vectors.shape)}"
            )
        if not np.isfinite(vectors).all():
            raise EmbeddingError("refusing to cache embeddings with NaN or infinite values")
        with self._write_lock():
            rows = self.rows(keys)
            new = [i for i, r in enumerate(rows) if r is None]
            new = list({keys[i]: i for i in new}.values())  # duplicates within the batch: keep the last
            if not new:
                return
            with self._vectors.open("ab") as fh:
                start = fh.tell() // (4 * self.dim)
                fh.write(vectors[new].tobytes())
                fh.flush()
            with self._db:
                self._db.executemany(
                    "INSERT OR IGNORE INTO idx VALUES (?, ?)",
                    [(keys[i], start + j) for j, i in enumerate(new)],
                )

    def get_or_encode(
        self, keys: Sequence[str], encode: Callable[[list[int]], np.ndarray], batch_size: int = 256
    ) -> np.ndarray:
        """Vectors for ``keys``, encoding only the missing ones.

        Args:
            encode: called with positions (into ``keys``) of the missing items, at most
                ``batch_size`` at a time; returns their vectors [len(positions), D].
        Returns:
            [N, D] float32.
        """
        out, mask = self.get(keys)
        missing = np.flatnonzero(~mask).tolist()
        for i in range(0, len(missing), batch_size):
            pos = missing[i : i + batch_size]
            vecs = np.asarray(encode(pos), dtype=np.float32)
            self.put([keys[p] for p in pos], vecs)
            out[pos] = vecs
        return out

    @contextmanager
    def _write_lock(self):
        with self._lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def close(self) -> None:
        self._db.close()

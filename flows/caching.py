"""Cache keys for the curriculum's tasks.

A stage's result is reusable exactly when the settings that shape it and the
artifact it starts from are unchanged, so its key is the hash of those settings
plus the content hash of the upstream artifact. The run name and root are left out
(moving a run does not change what it trains); the launcher is left out too (the
same job on one GPU or eight gives the same stage).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from arr_coc.config import RunConfig

# Sections every stage depends on, besides its own ``stages.<name>`` section.
SHARED_KEYS = ["seed", "model", "allocator", "data"]
DATA_KEYS = ["seed", "data", "model.image_size"]
CHUNK = 1 << 20


def stage_fingerprint(cfg: RunConfig, name: str) -> str:
    """Hash of the config that determines stage ``name``'s result."""
    return cfg.fingerprint(SHARED_KEYS + [f"stages.{name}"])


def data_fingerprint(cfg: RunConfig) -> str:
    return cfg.fingerprint(DATA_KEYS)


def hash_tree(path: str | Path | None) -> str:
    """Content hash of a file or directory (relative names and bytes), ``none`` for no path.

    Checkpoint folders are not part of an artifact, so an artifact's hash changes only
    when its exported weights, metrics or config change.
    """
    if path is None:
        return "none"
    root = Path(path)
    digest = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(root) if file != root else file.name).encode())
        digest.update(b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def combine(*parts: str) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

"""The per-user cache folder of crd-jax (compiled programs, parameter shapes): ``$CRD_JAX_CACHE_DIR``, else
``$XDG_CACHE_HOME/crd_jax`` or ``~/.cache/crd_jax``; ``CRD_JAX_CACHE_DIR=off`` disables caching."""

from __future__ import annotations

import os
from typing import Optional


def cache_folder(part: str) -> Optional[str]:
    """``<cache root>/<part>``, created if need be; ``None`` when caching is off or the folder cannot be made
    (a cache only saves time: never a reason to fail)."""
    root = os.environ.get("CRD_JAX_CACHE_DIR", "")
    if root.lower() in ("off", "0", "none"):
        return None
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "crd_jax")
    path = os.path.join(root, part)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    return path

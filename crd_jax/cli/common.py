"""What several subcommands (and ``train.py``) share that is not an option: reading a config file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from crd_jax.errors import InputError

if TYPE_CHECKING:
    import ml_collections


def load_config(path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file (as ``train.py --config=...`` would)."""
    path_obj = Path(path)
    if not path_obj.exists():
        raise InputError(path, "no such config file")
    from crd_jax.data.io import check_input_file

    check_input_file(path_obj, "a config file (.py)")
    root = str(path_obj.resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # configs may import each other as ``configs.x``
    spec = importlib.util.spec_from_file_location(f"_crd_config_{path_obj.stem}", path_obj)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config()
    except Exception as exc:
        raise InputError(path, f"config does not load ({type(exc).__name__}: {exc})") from None

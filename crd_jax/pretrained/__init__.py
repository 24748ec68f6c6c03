"""Models shipped inside the package, by name (``crd-jax register --model lpba40-vm-ll-crd``).

Each shipped model is a model folder under this package (``<name>/model.json`` + ``params.msgpack``, plain
arrays) whose ``model.json`` also says what it was trained on, its grid and voxel size, its preprocessing and
its measured validation Dice (``shipped``). ``benchmarks/ship_models.py`` copies them from a finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from crd_jax.errors import InputError

HERE = Path(__file__).resolve().parent
DEFAULT_PREFERENCE = ("lpba40-vm-ll-crd", "lpba40-vm-l-crd")  # the best shipped VM-L(L)-CRD is the default


def shipped(root: Optional[Path] = None) -> Dict[str, Path]:
    """``{name: folder}`` of the models shipped in ``root`` (this package)."""
    root = Path(root) if root is not None else HERE
    return {p.name: p for p in sorted(root.iterdir()) if (p / "model.json").is_file() and (p / "params.msgpack").is_file()}


def describe(folder: Path) -> Dict:
    spec = json.loads((folder / "model.json").read_text())
    return {
        "name": folder.name,
        "label": spec.get("label", ""),
        **spec.get("shipped", {}),
        "preprocessing": spec.get("preprocessing", {}),
    }


def default_model(root: Optional[Path] = None) -> Optional[str]:
    models = shipped(root)
    return next((n for n in DEFAULT_PREFERENCE if n in models), None)


def resolve(model: Optional[str], root: Optional[Path] = None) -> Path:
    """A model folder from ``--model``: an existing path, else a shipped model's name, else the default."""
    models = shipped(root)
    if not model:
        name = default_model(root)
        if name is None:
            raise InputError("--model", "no model given and this installation ships none; pass a model folder")
        return models[name]
    path = Path(model)
    if path.exists() or any(sep in model for sep in ("/", "\\")) or model.startswith("."):
        return path
    if model in models:
        return models[model]
    names = ", ".join(models) or "none"
    raise InputError(model, f"no such model folder or shipped model (shipped: {names})")


def listing(root: Optional[Path] = None) -> List[Dict]:
    return [describe(folder) for folder in shipped(root).values()]

"""The backbone registry: everything the rest of crd-jax needs to know about a registration network.

Each entry declares its own config fields with their defaults (what ``model.json`` stores besides the
common fields), how to build the Flax module from an architecture dict, how many stride-2 levels it has
(canvas sides must divide by ``2^(levels + k)``), its short name in table labels, and how to build its FST
head (Section III-B) for a resolution factor. Adding a backbone is one :func:`register_backbone` call; see
``docs/extending.md``.

A backbone module maps ``(moving, fixed)`` (``(B, *spatial, 1)`` each) to a dict with ``disp``
(``(B, *spatial, ndim)``, voxels) and ``features`` (``{level: (B, *spatial / 2^level, C)}``); optionally
``fields`` (intermediate fields by level, distilled by eq. 11) and ``velocity``.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable, Dict, Mapping, Optional

import flax.linen as nn

#: fields every architecture has, whatever its backbone
COMMON = {
    "backbone": "voxelmorph",
    "negative_slope": 0.2,
    "diffeomorphic": False,
    "int_steps": 7,
    "cascade": 1,
    "affine": "none",
    "affine_channels": [16, 32, 64, 128, 256],
    "fusion": "paper",
    "teacher_align_corners": False,
    "teacher_output": "half",  # FST phi^T on the student's grid (the paper) or "full" (the authors' code)
}


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
    name: str
    fields: Mapping[str, Any]  # the backbone's own fields and their defaults
    build: Callable[[Mapping[str, Any], Optional[str]], nn.Module]  # (arch, module name) -> module
    levels: Callable[[Mapping[str, Any]], int]
    label: str  # "VM", "Pyd": the prefix of table rows ("VM-L-CRD")
    fst_head: Optional[Callable[[Mapping[str, Any], int], nn.Module]] = None  # (arch, factor) -> head


REGISTRY: Dict[str, BackboneEntry] = {}


def register_backbone(entry: BackboneEntry) -> None:
    clash = set(entry.fields) & set(COMMON)
    if clash:
        raise ValueError(f"backbone {entry.name!r} redefines common fields {sorted(clash)}")
    REGISTRY[entry.name] = entry


def entry(arch: Mapping[str, Any]) -> BackboneEntry:
    name = arch.get("backbone", COMMON["backbone"])
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r} (registered: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def architecture(model_cfg: Mapping[str, Any]) -> dict:
    """The common fields and the backbone's own, as plain JSON-able values (defaults filled in)."""
    own = entry(model_cfg).fields
    return {k: _plain(model_cfg[k] if k in model_cfg else default) for k, default in {**COMMON, **own}.items()}


def check_architecture(arch: Mapping[str, Any]) -> None:
    """Rejects fields that neither the backbone nor the common set knows (a ``model.json`` written for another
    version or backbone would otherwise rebuild a different model silently)."""
    known = {**COMMON, **entry(arch).fields}
    for key in arch:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"architecture field '{key}' is unknown to the {arch.get('backbone')!r} backbone{hint}")

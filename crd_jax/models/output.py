"""What every registration network returns: one typed, pytree-registered record (``flax.struct``).

* ``disp``: the displacement on the input grid ``(B, *spatial, ndim)``, voxels (``up(phi)`` for a
  low-resolution registrar, eq. 5);
* ``features``: decoder (or, for pyramids, two-stream encoder) features by level, ``{l: F_l}``;
* ``disp_low``: the field on the network's own grid (``phi^L``, what eq. 8 distils), set by registrars and
  teachers;
* ``fields``: intermediate fields by level (pyramids; eq. 11), ``None`` otherwise;
* ``velocity``: the stationary velocity of a diffeomorphic model, ``None`` otherwise;
* ``extras``: model-specific outputs by name (the affine network's ``matrix`` and ``translation``).

``out["disp"]``, ``"fields" in out`` and ``out.get(...)`` keep working for code written against the dict
outputs of earlier releases.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import flax.struct
import jax

FIELDS = ("disp", "features", "disp_low", "fields", "velocity")


@flax.struct.dataclass
class ModelOutput:
    disp: jax.Array
    features: Dict[int, jax.Array] = flax.struct.field(default_factory=dict)
    disp_low: Optional[jax.Array] = None
    fields: Optional[Dict[int, jax.Array]] = None
    velocity: Optional[jax.Array] = None
    extras: Dict[str, Any] = flax.struct.field(default_factory=dict)

    def __getitem__(self, key: str):
        value = getattr(self, key) if key in FIELDS else self.extras.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: str) -> bool:
        return (getattr(self, key) if key in FIELDS else self.extras.get(key)) is not None

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> List[str]:
        return [k for k in FIELDS if getattr(self, k) is not None] + list(self.extras)


def as_output(out: ModelOutput | Mapping[str, Any]) -> ModelOutput:
    """A :class:`ModelOutput` from itself or from a mapping with the same keys (unknown keys go to extras)."""
    if isinstance(out, ModelOutput):
        return out
    if not isinstance(out, Mapping):
        raise TypeError(f"expected a model output, got {type(out).__name__}")
    known = {k: out[k] for k in FIELDS if k in out}
    extras = {k: v for k, v in out.items() if k not in FIELDS}
    return ModelOutput(**known, extras=extras)

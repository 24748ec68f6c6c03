"""Type aliases and protocols shared by the package's annotations.

Nothing here is checked at run time, and the module imports nothing heavy (the types it names are imported
for type checkers only), so any module may use it without slowing ``import crd_jax`` or the CLI's start.

* ``Params``: a model's parameter tree as Flax returns it: nested dicts of arrays whose structure depends on
  the architecture (in training states, optimizer states and frozen parts alongside). ``Any`` is honest: no
  static type describes every architecture's tree, and JAX treats it as a pytree.
* ``Model``: what the training, evaluation and registration code calls, ``apply(params, moving, fixed)``
  returning a :class:`~crd_jax.models.output.ModelOutput` (:class:`~crd_jax.models.registrar.Registrar`,
  :class:`~crd_jax.models.teacher.Teacher`, :class:`~crd_jax.models.teacher.ResampledTeacher`).
* ``PyTree``: any nested containers of arrays (``Any`` for the same reason as ``Params``).
* ``Dataset``: what pairs are drawn from (:class:`~crd_jax.data.dataset.VolumeDataset`,
  :class:`~crd_jax.data.dataset.SliceDataset`, :class:`~crd_jax.data.synthetic.SyntheticDataset`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Protocol

if TYPE_CHECKING:
    import jax
    import numpy as np

    from crd_jax.data.preprocess import Placement
    from crd_jax.models.output import ModelOutput

Params = Any
"""A pytree of model parameters (nested dicts of ``jax.Array``), e.g. ``registrar.init(...)``'s result."""

PyTree = Any
"""Any nested structure of lists, tuples and dicts with arrays at the leaves (a batch, a training state)."""


class Model(Protocol):
    """A registration network with its resolution: ``apply(params, moving, fixed)`` on ``(B, *spatial, 1)``."""

    def apply(self, params: Params, moving: jax.Array, fixed: jax.Array) -> ModelOutput: ...


class Dataset(Protocol):
    """Subjects by index: ``len(ds)``, ``ds.image(i)``, ``ds.labels(i)`` (None without label maps)."""

    def __len__(self) -> int: ...

    @property
    def has_labels(self) -> bool: ...

    @property
    def ids(self) -> List[str]: ...

    @property
    def placement(self) -> Placement: ...

    def image(self, i: int) -> np.ndarray: ...

    def labels(self, i: int) -> Optional[np.ndarray]: ...

"""Loading a model: a model folder read and checked against its own architecture, its canvas multiple, its
one compiled predictor, and per-pair instance optimisation of the predicted field."""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crd_jax.compile import persistent_jit
from crd_jax.data.io import atomic_path
from crd_jax.errors import InputError
from crd_jax.model_io import load_model
from crd_jax.models.build import model_from_spec

if TYPE_CHECKING:
    from crd_jax.data.io import PathLike
    from crd_jax.registration.pipeline import Prepared
    from crd_jax.typing import Model, Params


@dataclasses.dataclass
class LoadedModel:
    model: object
    params: object
    spec: Dict
    path: str

    @property
    def ndim(self) -> int:
        return int(self.spec.get("preprocessing", {}).get("ndim", 3))


def load(path: PathLike) -> LoadedModel:
    """A model folder (a training stage's ``model`` or the output of ``convert-official``), checked against
    its own architecture so that a mismatched checkpoint fails here with one line."""
    params, spec = load_model(path)
    try:
        model = model_from_spec(spec)
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"unusable model description ({exc})") from None
    _check_structure(model, params, spec, path)
    return LoadedModel(model, params, spec, str(path))


def _check_structure(model, params, spec, path) -> None:
    ndim = int(spec.get("preprocessing", {}).get("ndim", 3))
    n = int(spec["factor"])
    shape = (1, *(32 * n,) * ndim, 1)
    if spec["kind"] == "teacher":

        def expected():
            x = jnp.zeros(shape)
            bp = model.backbone.init(jax.random.PRNGKey(0), x, x)["params"]
            high, low = model.backbone_features(bp, x, x)
            return {"backbone": bp, "head": model.head.init(jax.random.PRNGKey(0), high, low)["params"]}
    else:

        def expected():
            x = jnp.zeros(shape)
            return model.backbone.init(jax.random.PRNGKey(0), x, x)["params"]

    want_shapes = _cached_shapes(
        spec,
        ndim,
        lambda: {
            jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(jax.eval_shape(expected))
        },
    )
    got_shapes = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    if want_shapes != got_shapes:
        diff = sorted(set(want_shapes.items()) ^ set(got_shapes.items()))[:2]
        raise InputError(path, f"parameters do not match the model's architecture (first differences: {diff})")


def _cached_shapes(spec, ndim: int, compute) -> Dict[str, tuple]:
    """The parameter shapes an architecture has, remembered per architecture in the user's cache folder
    (tracing the model's ``init`` costs a few tenths of a second on every call otherwise)."""
    import hashlib
    import json
    import os

    import crd_jax
    from crd_jax.user_cache import cache_folder

    key = json.dumps(
        [spec.get("architecture"), spec["kind"], int(spec["factor"]), ndim, crd_jax.__version__, jax.__version__],
        sort_keys=True,
        default=str,
    )
    root = cache_folder("shapes")
    if root is None:
        return compute()
    path = os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        with open(path) as f:
            return {k: tuple(v) for k, v in json.load(f).items()}
    except (OSError, ValueError):
        pass
    shapes = compute()
    try:
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            json.dump(shapes, f)
    except (OSError, InputError):
        pass  # an unwritable cache only costs time
    return shapes


def canvas_multiple(spec: Mapping) -> int:
    """The side multiple a saved model needs: its record, and ``2^levels * n`` for a registrar."""
    pre = spec.get("preprocessing", {})
    multiple = int(pre.get("multiple", 32))
    if spec.get("kind") == "registrar":
        from crd_jax.models.build import levels, spec_architecture

        multiple = max(multiple, 2 ** levels(spec_architecture(spec)) * int(spec["factor"]))
    return multiple


@functools.lru_cache(maxsize=16)
def predictor(model: Model) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """The model's jitted ``(params, moving, fixed) -> disp`` (one per model object; with
    :func:`crd_jax.compile.cache_executables` on, its program is kept on disk, keyed by the model's repr)."""
    return persistent_jit(lambda p, m, f: model.apply(p, m, f).disp, context=repr(model))


def predict(model: Model, params: Params, moving: jax.Array, fixed: jax.Array) -> jax.Array:
    return predictor(model)(params, moving, fixed)


@functools.lru_cache(maxsize=16)
def _instance_optimiser(model, learning_rate: float, reg_weight: float, window: int):
    """Three compiled programs: ``begin(params, m, f) -> (w, state, loss)`` (the network's field on its own
    grid), ``run(w, state, m, f, n) -> (w, state)`` (``n`` Adam steps, ``n`` a traced count: one program for
    every chunk) and ``end(w, m, f) -> (disp, loss)``."""
    import optax

    from crd_jax.ops.spatial import upsample_field
    from crd_jax.losses import registration_loss

    opt = optax.adam(learning_rate)

    def factor_of(m, w):
        return m.shape[1] // w.shape[1]

    def loss(w, m, f):
        factor = factor_of(m, w)
        disp = upsample_field(w, factor) if factor > 1 else w
        return registration_loss(m, f, disp, reg_weight, window)[0]

    def begin(params, m, f):
        out = model.apply(params, m, f)
        low = jax.lax.stop_gradient(out.disp if out.disp_low is None else out.disp_low)
        return low, opt.init(low), loss(low, m, f)

    def run(w, state, m, f, n):
        def body(_, carry):
            w, state = carry
            grads = jax.grad(loss)(w, m, f)
            updates, state = opt.update(grads, state, w)
            return optax.apply_updates(w, updates), state

        return jax.lax.fori_loop(0, n, body, (w, state))

    def end(w, m, f):
        factor = factor_of(m, w)
        return (upsample_field(w, factor) if factor > 1 else w), loss(w, m, f)

    return jax.jit(begin), jax.jit(run), jax.jit(end)


IO_CHUNK = 10  # Adam steps per compiled call: Ctrl-C (and SIGTERM) end instance optimisation within a chunk


def instance_optimise(
    model: Model,
    params: Params,
    prepared: Prepared,
    steps: int,
    learning_rate: float = 0.05,
    reg_weight: float = 1.0,
    window: int = 9,
) -> Tuple[jax.Array, float, float]:
    """Fine-tunes the predicted field for this pair (``prepared``, :class:`~crd_jax.registration.pipeline.Prepared`:
    ``steps`` of Adam on eq. 3, NCC + lambda * grad), starting from the network's prediction. The free
    variable is the field on the network's own grid (``phi^L`` for a low-resolution model), so a step costs a
    warp at the canvas and no network pass.
    The steps run in chunks of :data:`IO_CHUNK`, each waited for, so that Ctrl-C stops the optimisation
    between two chunks rather than after the last step. Returns ``(disp on the canvas, loss before, loss after)``."""
    begin, run, end = _instance_optimiser(model, float(learning_rate), float(reg_weight), int(window))
    w, state, before = begin(params, prepared.moving, prepared.fixed)
    done = 0
    while done < int(steps):
        n = min(IO_CHUNK, int(steps) - done)
        w, state = run(w, state, prepared.moving, prepared.fixed, jnp.int32(n))
        jax.block_until_ready(w)  # back in Python between chunks: a pending KeyboardInterrupt is raised here
        done += n
    disp, after = end(w, prepared.moving, prepared.fixed)
    return disp, float(before), float(after)

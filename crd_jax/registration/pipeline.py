"""The registration pipeline: prepare -> predict -> map back -> warp, on the device.

:func:`register_volumes` takes two loaded volumes (any orientation, voxel size and size) and returns the
displacement, the warped image and label map and the fold count on the fixed image's grid:

1. the inputs are checked (:mod:`~crd_jax.registration.checks`), the moving image brought onto the fixed grid
   through both affines, and optionally aligned affinely (:mod:`crd_jax.affine_align`);
2. :func:`prepare` puts both into the model's space (:mod:`~crd_jax.registration.space`: its orientation, its
   voxel size, its intensity normalisation, centred on a canvas the network takes);
3. the model predicts the field there (:mod:`~crd_jax.registration.model`), optionally refined per pair;
4. :func:`map_back` returns it to the fixed image's grid and orientation, the affine map composed in;
5. the moving image and labels are warped with it (:mod:`~crd_jax.registration.warping`).

The full-size field exists once, as a JAX array; nothing at full resolution goes back and forth to the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crd_jax.compile import persistent_jit
from crd_jax.data.io import Volume, load_image, load_labels
from crd_jax.data.preprocess import Placement, apply_normalize, normalize_params, padded_shape, place
from crd_jax.ops.spatial import resize_field
from crd_jax.registration import checks, space, warping
from crd_jax.allocator import release_free_memory
from crd_jax.registration.model import LoadedModel, canvas_multiple, instance_optimise, predict

#: each step's time, logged as it ends (INFO; ``crd-jax -q``/``-v`` set the level, ``register --pairs`` lowers
#: it to DEBUG so that thousands of pairs print one line each)
log = logging.getLogger("crd_jax.registration.steps")


@contextlib.contextmanager
def step(name: str, timings: Optional[dict] = None) -> Iterator[None]:
    """Times the block and logs ``name: seconds`` when it ends (``timings[name]`` gets the seconds)."""
    log.debug("%s ...", name)
    t = time.perf_counter()
    yield
    took(name, t, timings)


def took(name: str, start: float, timings: Optional[dict] = None) -> None:
    """Logs and records the time since ``start`` (``time.perf_counter()``) as step ``name``."""
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = round(timings.get(name, 0.0) + seconds, 4)
    log.info("%s: %.2f s", name, seconds)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Network inputs ``(1, *canvas, 1)`` and the way back to the caller's grid."""

    moving: jax.Array
    fixed: jax.Array
    grid: Tuple[int, ...]  # the caller's grid
    work: Tuple[int, ...]  # the model's grid (resample_shape), or the caller's
    placement: Placement  # work -> canvas

    @property
    def notes(self) -> List[str]:
        out = []
        if self.work != self.grid:
            out.append(f"network input resampled to {self.work} as in training")
        if self.placement.canvas_shape != self.work:
            out.append(f"padded {self.work} -> {self.placement.canvas_shape} for the network, result mapped back")
        return out


def normalisation(preprocessing: Mapping, mode: str) -> Tuple[str, Sequence[float]]:
    """The normalisation to apply (``mode = "model"``: the model's own) and its percentiles."""
    mode = preprocessing.get("normalize", "none") if mode == "model" else mode
    return mode, preprocessing.get("percentiles", [0.5, 99.5])


def prepare(
    preprocessing: Mapping, multiple: int, fixed: np.ndarray, moving: np.ndarray, mode: str = "model"
) -> Tuple[Prepared, str]:
    """``fixed``/``moving`` (one grid, raw intensities) -> the network's input on the model's canvas, exactly as
    the model was trained (its ``preprocessing`` record), with the work at full resolution reduced to what it
    must be: the normalisation's statistics are taken on the full images, the images are resampled onto the
    model's grid (:func:`~crd_jax.registration.space.resample_linear`) as they are, and the (affine)
    normalisation is applied to the small ones. Returns ``(prepared, mode)``."""
    mode, percentiles = normalisation(preprocessing, mode)
    params = [normalize_params(a, mode, *percentiles) for a in (fixed, moving)]
    grid = tuple(fixed.shape)
    work = tuple(preprocessing.get("resample_shape") or ()) or grid
    small = [space.resample_linear(a, work) for a in (fixed, moving)]
    f_in, m_in = (apply_normalize(a, q) for a, q in zip(small, params))
    placement = place(work, padded_shape(work, multiple))
    as_input = lambda a: jnp.asarray(placement.apply(np.asarray(a, np.float32))[None, ..., None])  # noqa: E731
    return Prepared(as_input(m_in), as_input(f_in), grid, work, placement), mode


def map_back(prepared: Prepared, disp_canvas: np.ndarray | jax.Array) -> jax.Array:
    """A ``(*canvas, ndim)`` (or batched) field on the canvas -> ``(*grid, ndim)`` on the caller's grid, as a
    JAX array: cropped, resampled and rescaled in one compiled program, so that the full-size field exists
    once, on the device (``np.asarray`` of it is a view on CPU)."""
    disp = jnp.asarray(disp_canvas, jnp.float32)
    src, dst = prepared.placement._windows()
    windows = tuple((d.start, d.stop, s.start, n - s.stop) for s, d, n in zip(src, dst, prepared.placement.source_shape))
    return _map_back(disp, windows, tuple(prepared.work), tuple(prepared.grid))


@persistent_jit(static_argnums=(1, 2, 3))
def _map_back(disp, windows, work, grid):
    disp = disp[0] if disp.ndim == len(grid) + 2 else disp
    inner = disp[tuple(slice(a, b) for a, b, _, _ in windows)]
    pad = [(before, after) for _, _, before, after in windows] + [(0, 0)]
    restored = jnp.pad(inner, pad, mode="edge")  # voxels cropped away take the nearest canvas value
    if work == grid:
        return restored
    return resize_field(restored[None], grid)[0]


def onto_grid_labels(labels: Volume, target: Volume) -> np.ndarray:
    """``onto_grid(labels, target, 0)`` that keeps every label exactly (64-bit values through indices)."""
    if labels.data.dtype.itemsize <= 4:
        return space.onto_grid(labels, target, order=0)
    indices, values = warping.compact_labels(labels.data)
    return values[space.onto_grid(dataclasses.replace(labels, data=indices), target, order=0)]


def labels_on_grid(labels: Optional[Volume], image: Volume, what: str = "fixed image") -> Optional[np.ndarray]:
    """A label map's voxels on ``image``'s grid (checked to cover it), or ``None``."""
    if labels is None:
        return None
    checks.check_label_grid(labels, image, what)
    return labels.data if space.same_grid(labels, image) else onto_grid_labels(labels, image)


def load_pair(
    loaded: LoadedModel, fixed: str, moving: str, moving_seg: Optional[str] = None, fixed_seg: Optional[str] = None
) -> Tuple[Volume, Volume, Optional[Volume], Optional[Volume]]:
    """Reads every input before anything is written, so bad input leaves no partial output. (Reading the
    files concurrently saved a tenth of a second and cost 60 MB of peak memory: they are read in turn.)"""
    ndim = loaded.ndim
    with step("load"):
        return (
            load_image(fixed, ndim, require_orientation=True),
            load_image(moving, ndim, require_orientation=True),
            load_labels(moving_seg, ndim, require_orientation=True) if moving_seg else None,
            load_labels(fixed_seg, ndim, require_orientation=True) if fixed_seg else None,
        )


def register_volumes(
    loaded: LoadedModel,
    fixed: Volume,
    moving: Volume,
    moving_seg: Optional[Volume] = None,
    normalize_mode: str = "model",
    io_steps: int = 0,
    affine: str = "",
    jacobian: bool = False,
    network_field: bool = False,
) -> Tuple[Dict[str, Any], List[str]]:
    """``(result, notes)``: ``result`` has ``disp`` (fixed grid, voxels), ``warped``, ``folds`` (voxels with
    det J <= 0), ``warped_seg``, ``warning`` (a line, or ``None``), ``affine`` (with ``affine``), ``timings``
    (seconds per step) and, with ``jacobian``, the map of det J (float32); with ``network_field``, the
    field at the network's resolution and the way back (:class:`~crd_jax.registration.compact.NetworkField`).

    ``normalize_mode``: ``model`` (what the model was trained with) or a
    :func:`~crd_jax.data.preprocess.normalize` mode; ``affine``: ``""``, ``"ncc"`` or ``"nmi"``."""
    notes: List[str] = []
    timings: dict = {}
    checks.check_images(fixed, moving)
    checks.check_model_grid(loaded, fixed, moving)
    moving_data = moving.data
    seg_data = moving_seg.data if moving_seg is not None else None
    if moving_seg is not None:
        checks.check_label_grid(moving_seg, moving, "moving image")
        if not space.same_grid(moving_seg, fixed):  # through the label map's own affine (exact for 64-bit labels)
            seg_data = onto_grid_labels(moving_seg, fixed)
    if not space.same_grid(fixed, moving):
        moving_data = space.onto_grid(moving, fixed, order=1)
        notes.append(
            f"moving image resampled onto the fixed grid (shape {moving.data.shape} -> {fixed.data.shape}, "
            f"spacing {tuple(round(s, 3) for s in moving.spacing)} -> {tuple(round(s, 3) for s in fixed.spacing)})"
        )
    affine_result, warning = None, None
    if affine:
        from crd_jax.affine_align import align
        from crd_jax.data.preprocess import normalize as _normalize

        with step("affine", timings):
            affine_result = align(_normalize(fixed.data, "minmax"), _normalize(moving_data, "minmax"), affine)
            full_moving = moving_data
            moving_data = warping.warp_image(moving_data, affine_result.displacement(fixed.data.shape))
        moved = checks.mean_displacement_mm(affine_result.displacement(fixed.data.shape), fixed)
        notes.append(
            f"affine pre-alignment ({affine}): loss {affine_result.loss_before:.4f} -> "
            f"{affine_result.loss_after:.4f}, moving the fixed image's foreground by a mean {moved:.1f} mm"
        )
        if moved > checks.AFFINE_MOVED_MM:
            warning = (
                f"the input was not pre-aligned: the affine step moved the fixed image's foreground by a mean "
                f"{moved:.1f} mm (above {checks.AFFINE_MOVED_MM:g} mm); check affine.txt and the overlay"
            )
    apart = checks.centroid_distance_mm(fixed, moving_data)
    if warning is None and apart > checks.CENTROIDS_MM:
        warning = f"the images' foreground centroids are {apart:.1f} mm apart (above {checks.CENTROIDS_MM:g} mm) " + (
            "after the affine step: it may have failed; check the overlay"
            if affine
            else "and no affine step ran: the input looks not pre-aligned; run without --no-affine"
        )
    domain = checks.domain_warning_once(loaded, (fixed, moving))  # once per process: the inputs as given
    if domain:
        warning = domain if warning is None else f"{warning}; {domain}"
    started = time.perf_counter()  # "prepare": into the model's space and onto its canvas
    pre = dict(loaded.spec.get("preprocessing", {}))
    record = pre.get("geometry")
    fixed_net, moving_net, transform = fixed.data, moving_data, None
    if record and fixed.data.ndim == 3:
        # the model's own space: its orientation (axes permuted/flipped, no resampling) and its voxel size
        fixed_m, transform = space.to_model_space(fixed, record["orientation"])
        moving_net = space.to_model_space(Volume(moving_data, fixed.affine), record["orientation"])[0].data
        fixed_net = fixed_m.data
        voxel = space.model_voxel_size(record, loaded.spec["preprocessing"])
        pre["resample_shape"] = list(space.model_work_shape(fixed_m, voxel))
        codes = space.axis_codes(fixed.affine)
        if codes != record["orientation"]:
            notes.append(f"reoriented {codes} -> {record['orientation']} (the model's orientation), result mapped back")
    prepared, mode = prepare(pre, canvas_multiple(loaded.spec), fixed_net, moving_net, normalize_mode)
    del fixed_net, moving_net  # full-resolution copies are not needed past this point
    release_free_memory()
    # on the network's input (the model's grid): what the network sees
    checks.check_intensities(loaded, prepared.placement.restore(np.asarray(prepared.fixed)[0, ..., 0]), fixed.path, mode)
    checks.check_intensities(loaded, prepared.placement.restore(np.asarray(prepared.moving)[0, ..., 0]), moving.path, mode)
    if mode != "none":
        notes.append(f"intensities scaled to [0, 1] ({mode}{'' if normalize_mode != 'model' else ', as the model was trained'})")
    notes += prepared.notes
    took("prepare", started, timings)
    with step("predict" if io_steps <= 0 else f"predict + instance optimisation ({io_steps} steps)", timings):
        if io_steps > 0:
            disp_canvas, before, after = instance_optimise(loaded.model, loaded.params, prepared, io_steps)
            disp_canvas = np.asarray(disp_canvas)
            notes.append(f"instance optimisation: {io_steps} steps, loss {before:.4f} -> {after:.4f}")
        else:
            disp_canvas = np.asarray(predict(loaded.model, loaded.params, prepared.moving, prepared.fixed))
    checks.check_finite("displacement", disp_canvas, loaded.path)
    with step("map back", timings):
        # the full-size field stays a JAX array (one copy, no host round trips); np.asarray of it is a view
        disp = map_back(prepared, disp_canvas)
        if transform is not None:
            disp = space.field_to_original(disp, transform, fixed.data.shape)
        if affine_result is not None:  # first the deformable field, then the affine map: one interpolation
            from crd_jax.ops.spatial import compose

            u_aff = jnp.asarray(affine_result.displacement(fixed.data.shape))[None]
            disp = compose(u_aff, disp[None])[0]
            moving_data = full_moving
        disp.block_until_ready()
    with step("warp", timings):
        warped = warping.warp_image(moving_data, disp)
        checks.check_finite("warped image", warped, loaded.path)
        result = {
            "disp": np.asarray(disp),
            "warped": warped,
            "folds": warping.count_folds(disp),
            "warning": warning,
            "timings": timings,
        }
        if jacobian:
            result["jacobian"] = warping.jacobian_determinant(disp)
        if affine_result is not None:
            result["affine"] = affine_result
        if seg_data is not None:
            result["warped_seg"] = warping.warp_labels(seg_data, disp)
    if network_field:
        from crd_jax.registration.compact import NetworkField

        result["network_field"] = NetworkField.of(prepared, disp_canvas, transform, affine_result)
    return result, notes

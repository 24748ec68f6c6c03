"""Registering two volumes with a saved model: what ``crd-jax register`` and ``crd-jax figure`` share."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crd_jax.cli.allocator import release_free_memory
from crd_jax.data.io import Volume, atomic_path, load_image, load_labels
from crd_jax import geometry, inference
from crd_jax.errors import InputError
from crd_jax.geometry import onto_grid, same_grid, world_gap
from crd_jax.models.build import model_from_spec
from crd_jax.model_io import load_model


@dataclasses.dataclass
class LoadedModel:
    model: object
    params: object
    spec: Dict
    path: str

    @property
    def ndim(self) -> int:
        return int(self.spec.get("preprocessing", {}).get("ndim", 3))


def load(path) -> LoadedModel:
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
    want_shapes = _cached_shapes(spec, ndim, lambda: {
        jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(jax.eval_shape(expected))})
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

    key = json.dumps([spec.get("architecture"), spec["kind"], int(spec["factor"]), ndim, crd_jax.__version__,
                      jax.__version__], sort_keys=True, default=str)
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


MIN_SIDE = 16  # voxels: below this a 4-level network sees a few voxels and nothing meaningful registers
MAX_ANISOTROPY = 20.0  # largest / smallest voxel side: beyond this a slab of thick slices, not a volume
INTENSITY_RATIO = 4.0  # how far the input's 99th percentile may be from the training data's


def check_images(fixed: Volume, moving: Volume) -> None:
    """Refuses pairs that would give meaningless output with exit 0: tiny, constant, or non-overlapping."""
    for vol in (fixed, moving):
        if min(vol.data.shape) < MIN_SIDE:
            raise InputError(vol.path, f"image of {'x'.join(map(str, vol.data.shape))} voxels is too small to register "
                                       f"(at least {MIN_SIDE} per side)")
        lo, hi = float(vol.data.min()), float(vol.data.max())
        if hi <= lo:
            raise InputError(vol.path, f"image is constant (every voxel is {lo:g}): nothing to register")
        spacing = np.asarray(vol.spacing)
        if spacing.max() > MAX_ANISOTROPY * spacing.min():
            raise InputError(vol.path, f"voxels of {' x '.join(f'{v:g}' for v in spacing)} mm are too anisotropic to "
                                       f"register ({spacing.max() / spacing.min():.0f}:1, at most {MAX_ANISOTROPY:g}:1); "
                                       "resample the image to near-isotropic voxels first")
    gap = world_gap(fixed, moving)
    if gap > 0:
        raise InputError(moving.path, f"does not overlap the fixed image {fixed.path} in world space: their boxes are "
                                      f"{gap:.1f} mm apart (check the affines, or align the images first)")


MAX_WORK_SIDE = 1024  # voxels per side of the model's grid: beyond this a model.json or an image is wrong
MAX_WORK_VOXELS = 1 << 27


def check_field_of_view(loaded: "LoadedModel", volumes, voxel=None, work=None) -> None:
    """Each input must cover at least ``MIN_SIDE`` voxels per side of the model's own grid (its training voxel
    size ``voxel`` where the model records one): a 20-voxel field of view at a 2.5 mm model voxel size reaches
    the network as 8 voxels per side and registers to noise with exit 0. ``work``: the model grid for this
    pair, bounded in size (a damaged ``model.json`` geometry could ask for billions of voxels)."""
    for vol in volumes:
        extent = np.asarray(vol.data.shape, np.float64)
        if voxel is not None:
            extent = extent * np.asarray(vol.spacing) / np.asarray(voxel, np.float64)
        seen = [int(round(e)) for e in extent]
        if min(seen) < MIN_SIDE:
            fov = " x ".join(f"{n * s:.0f}" for n, s in zip(vol.data.shape, vol.spacing))
            raise InputError(vol.path, f"field of view too small for this model: {fov} mm is "
                                       f"{'x'.join(map(str, seen))} voxels at the model's voxel size "
                                       f"({'x'.join(f'{v:g}' for v in (voxel or vol.spacing))} mm; at least {MIN_SIDE} per side)")
    if work is not None and min(int(w) for w in work) < MIN_SIDE:
        raise InputError(volumes[0].path, f"field of view too small for this model: it reaches the network as "
                                          f"{'x'.join(str(int(w)) for w in work)} voxels (at least {MIN_SIDE} per side)")
    if work is not None and (max(int(w) for w in work) > MAX_WORK_SIDE or int(np.prod([int(w) for w in work])) > MAX_WORK_VOXELS):
        raise InputError(loaded.path, f"the model's grid for this image would be {'x'.join(map(str, work))} voxels "
                                      f"(at most {MAX_WORK_SIDE} per side): check model.json's geometry and resample_shape")


def _check_model_grid(loaded: "LoadedModel", fixed: Volume, moving: Volume) -> None:
    """:func:`check_field_of_view` for a pair, before any computation."""
    pre = loaded.spec.get("preprocessing", {})
    record = pre.get("geometry")
    if record and fixed.data.ndim == 3:
        try:
            voxel = geometry.model_voxel_size(record, pre)
            vols = [geometry.to_model_space(v, record["orientation"])[0] for v in (fixed, moving)]
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(loaded.path, f"unusable geometry record in model.json ({exc})") from None
        check_field_of_view(loaded, vols, voxel, geometry.model_work_shape(vols[0], voxel))
    else:
        check_field_of_view(loaded, [fixed, moving], None, tuple(pre.get("resample_shape") or ()) or fixed.data.shape)


def check_label_grid(labels: Volume, image: Volume, what: str) -> None:
    """A label map must describe the voxels of its image: the same grid, or another grid over the same world
    box (axes flipped or permuted, with the affine to match; it is then resampled through its own affine,
    exactly, by nearest neighbour). A label map of another shape or elsewhere in world space is refused."""
    if sorted(labels.data.shape) != sorted(image.data.shape):
        raise InputError(labels.path, f"label map shape {labels.data.shape} differs from the {what}'s {image.data.shape}")
    if same_grid(labels, image):
        return
    (llo, lhi), (ilo, ihi) = geometry.world_box(labels), geometry.world_box(image)
    gap = float(np.max(np.abs(np.concatenate([llo - ilo, lhi - ihi]))))
    if gap > 0.5 * min(image.spacing):
        raise InputError(labels.path, f"label map lies on another grid than the {what} {image.path}: their world boxes "
                                      f"differ by up to {gap:.1f} mm (check the affines; labels must cover the same voxels)")


def compact_labels(labels: np.ndarray):
    """``(indices int32, values)`` with ``values[indices] == labels`` and label 0 at index 0 (background stays
    0 where a warp samples outside): label maps whose values do not fit in int32 are warped as indices, so
    every label survives exactly."""
    values = np.unique(labels)
    values = np.concatenate([np.zeros(1, values.dtype), values[values != 0]])
    order = np.argsort(values, kind="stable")
    indices = order[np.searchsorted(values[order], labels)].astype(np.int32)
    return indices, values


def onto_grid_labels(labels: Volume, target: Volume) -> np.ndarray:
    """``onto_grid(labels, target, 0)`` that keeps every label exactly (64-bit values through indices)."""
    if labels.data.dtype.itemsize <= 4:
        return onto_grid(labels, target, order=0)
    indices, values = compact_labels(labels.data)
    return values[onto_grid(dataclasses.replace(labels, data=indices), target, order=0)]


def warp_labels_exact(labels: np.ndarray, disp) -> np.ndarray:
    """:func:`inference.warp_labels`, with labels beyond int32 kept exactly (warped as indices)."""
    labels = np.asarray(labels)
    if labels.dtype.itemsize <= 4:
        return inference.warp_labels(labels, disp)
    indices, values = compact_labels(labels)
    return values[inference.warp_labels(indices, disp)]


def _check_intensities(loaded: LoadedModel, image: np.ndarray, path, mode: str) -> None:
    """The network input must look like what the model was trained on (the model stores the 99th percentile
    of its training inputs; models without it were trained on [0, 1] images)."""
    reference = float(loaded.spec.get("preprocessing", {}).get("intensity", {}).get("p99", 1.0))
    p99 = float(np.percentile(image, 99))
    if reference > 0 and not (reference / INTENSITY_RATIO <= p99 <= reference * INTENSITY_RATIO):
        hint = " pass --normalize minmax (or percentile) to rescale it" if mode == "none" else ""
        raise InputError(path, f"intensities (99th percentile {p99:.4g}) are far from the model's training data "
                               f"({reference:.4g});{hint or ' rescale the image'}")


def _check_finite(name: str, array: np.ndarray, model_path) -> None:
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise InputError(model_path, f"the model produced {bad} NaN/Inf values in the {name}; nothing was written")


def register_volumes(loaded: LoadedModel, fixed: Volume, moving: Volume, moving_seg: Optional[Volume] = None,
                     normalize_mode: str = "model", io_steps: int = 0, affine: str = "", jacobian: bool = False):
    """``(result, notes)``: ``result`` has ``disp`` (fixed grid, voxels), ``warped``, ``folds`` (voxels with
    det J <= 0), ``warped_seg`` and, with ``jacobian``, the map of det J (float32).

    ``normalize_mode``: ``model`` (what the model was trained with) or a :func:`normalize` mode."""
    notes: List[str] = []
    check_images(fixed, moving)
    _check_model_grid(loaded, fixed, moving)
    moving_data = moving.data
    seg_data = moving_seg.data if moving_seg is not None else None
    if moving_seg is not None:
        check_label_grid(moving_seg, moving, "moving image")
        if not same_grid(moving_seg, fixed):  # through the label map's own affine (exact for 64-bit labels)
            seg_data = onto_grid_labels(moving_seg, fixed)
    if not same_grid(fixed, moving):
        moving_data = onto_grid(moving, fixed, order=1)
        notes.append(
            f"moving image resampled onto the fixed grid (shape {moving.data.shape} -> {fixed.data.shape}, "
            f"spacing {tuple(round(s, 3) for s in moving.spacing)} -> {tuple(round(s, 3) for s in fixed.spacing)})"
        )
    affine_result, warning = None, None
    if affine:
        from crd_jax.affine_align import align
        from crd_jax.data.preprocess import normalize as _normalize

        affine_result = align(_normalize(fixed.data, "minmax"), _normalize(moving_data, "minmax"), affine)
        full_moving = moving_data
        moving_data = inference.warp_image(moving_data, affine_result.displacement(fixed.data.shape))
        moved = mean_displacement_mm(affine_result.displacement(fixed.data.shape), fixed)
        notes.append(f"affine pre-alignment ({affine}): loss {affine_result.loss_before:.4f} -> {affine_result.loss_after:.4f}, "
                     f"moving the fixed image's foreground by a mean {moved:.1f} mm")
        if moved > AFFINE_MOVED_MM:
            warning = (f"the input was not pre-aligned: the affine step moved the fixed image's foreground by a mean "
                       f"{moved:.1f} mm (above {AFFINE_MOVED_MM:g} mm); check affine.txt and the overlay")
    apart = centroid_distance_mm(fixed, moving_data)
    if warning is None and apart > CENTROIDS_MM:
        warning = (f"the images' foreground centroids are {apart:.1f} mm apart (above {CENTROIDS_MM:g} mm) "
                   + ("after the affine step: it may have failed; check the overlay" if affine else
                      "and no affine step ran: the input looks not pre-aligned; run without --no-affine"))
    pre = dict(loaded.spec.get("preprocessing", {}))
    record = pre.get("geometry")
    fixed_net, moving_net, transform = fixed.data, moving_data, None
    if record and fixed.data.ndim == 3:
        # the model's own space: its orientation (axes permuted/flipped, no resampling) and its voxel size
        fixed_m, transform = geometry.to_model_space(fixed, record["orientation"])
        moving_net = geometry.to_model_space(Volume(moving_data, fixed.affine), record["orientation"])[0].data
        fixed_net = fixed_m.data
        pre["resample_shape"] = list(geometry.model_work_shape(fixed_m, geometry.model_voxel_size(record, loaded.spec["preprocessing"])))
        codes = geometry.axis_codes(fixed.affine)
        if codes != record["orientation"]:
            notes.append(f"reoriented {codes} -> {record['orientation']} (the model's orientation), result mapped back")
    prepared, mode = inference.prepare_raw(pre, inference.canvas_multiple(loaded.spec), fixed_net, moving_net, normalize_mode)
    del fixed_net, moving_net  # full-resolution copies are not needed past this point
    release_free_memory()
    # on the network's input (the model's grid): what the network sees
    _check_intensities(loaded, prepared.placement.restore(np.asarray(prepared.fixed)[0, ..., 0]), fixed.path, mode)
    _check_intensities(loaded, prepared.placement.restore(np.asarray(prepared.moving)[0, ..., 0]), moving.path, mode)
    if mode != "none":
        notes.append(f"intensities scaled to [0, 1] ({mode}{'' if normalize_mode != 'model' else ', as the model was trained'})")
    notes += prepared.notes
    if io_steps > 0:
        disp_canvas, before, after = inference.instance_optimise(loaded.model, loaded.params, prepared, io_steps)
        disp_canvas = np.asarray(disp_canvas)
        notes.append(f"instance optimisation: {io_steps} steps, loss {before:.4f} -> {after:.4f}")
    else:
        disp_canvas = np.asarray(inference.predict(loaded.model, loaded.params, prepared.moving, prepared.fixed))
    _check_finite("displacement", disp_canvas, loaded.path)
    # the full-size field stays a JAX array (one copy, no host round trips); np.asarray of it is a view
    disp = inference.map_back_device(prepared, disp_canvas)
    if transform is not None:
        disp = geometry.field_to_original_device(disp, transform, fixed.data.shape)
    if affine_result is not None:  # first the deformable field, then the affine map: one interpolation
        from crd_jax.ops.spatial import compose

        u_aff = jnp.asarray(affine_result.displacement(fixed.data.shape))[None]
        disp = compose(u_aff, disp[None])[0]
        moving_data = full_moving
    warped = inference.warp_image(moving_data, disp)
    _check_finite("warped image", warped, loaded.path)
    result = {"disp": np.asarray(disp), "warped": warped, "folds": inference.count_folds(disp), "warning": warning}
    if jacobian:
        result["jacobian"] = inference.jacobian_determinant(disp)
    if affine_result is not None:
        result["affine"] = affine_result
    if seg_data is not None:
        result["warped_seg"] = warp_labels_exact(seg_data, disp)
    return result, notes


# The not-pre-aligned check (one warning line), set from LPBA40 validation pairs (affinely aligned, 1 mm; the
# first 10 of benchmarks/register_options.py, which counts the warnings: none there, 4 of 4 rotated inputs)
AFFINE_MOVED_MM = 10.0  # the affine step's mean displacement of the fixed foreground; those pairs: at most 6.6 mm
CENTROIDS_MM = 8.0  # the distance of the two foregrounds' centroids the network sees; those pairs: at most 4.2 mm


def centroid_distance_mm(fixed: Volume, moving_data) -> float:
    """The distance in mm between the centroids of the two images' foregrounds (voxels above a tenth of each
    image's intensity range), ``moving_data`` on the fixed grid."""
    spacing = np.asarray(fixed.spacing, np.float64)

    def centroid(data):
        data = jnp.asarray(data)
        lo, hi = jnp.min(data), jnp.max(data)
        mask = (data > lo + 0.1 * (hi - lo)).astype(jnp.float32)
        total = jnp.maximum(jnp.sum(mask), 1.0)
        return np.array([float(jnp.sum(mask * jnp.arange(n, dtype=jnp.float32).reshape([-1 if k == a else 1 for k in range(data.ndim)])) / total)
                         for a, n in enumerate(data.shape)])

    return float(np.linalg.norm((centroid(fixed.data) - centroid(moving_data)) * spacing))


def mean_displacement_mm(disp, fixed: Volume) -> float:
    """The mean length in mm of a displacement (fixed grid, voxels) over the fixed image's foreground (voxels
    above a tenth of its intensity range): the check of :data:`MISALIGNED_MM`."""
    data = np.asarray(fixed.data)
    lo, hi = float(data.min()), float(data.max())
    mask = jnp.asarray(data > lo + 0.1 * (hi - lo))
    length = jnp.sqrt(jnp.sum((jnp.asarray(disp, jnp.float32) * jnp.asarray(fixed.spacing, jnp.float32)) ** 2, axis=-1))
    return float(jnp.sum(jnp.where(mask, length, 0.0)) / jnp.maximum(jnp.sum(mask), 1))


def load_pair(loaded: LoadedModel, fixed: str, moving: str, moving_seg: Optional[str] = None,
              fixed_seg: Optional[str] = None) -> Tuple[Volume, Volume, Optional[Volume], Optional[Volume]]:
    """Reads every input before anything is written, so bad input leaves no partial output. (Reading the
    files concurrently saved a tenth of a second and cost 60 MB of peak memory: they are read in turn.)"""
    ndim = loaded.ndim
    return (
        load_image(fixed, ndim, require_orientation=True),
        load_image(moving, ndim, require_orientation=True),
        load_labels(moving_seg, ndim, require_orientation=True) if moving_seg else None,
        load_labels(fixed_seg, ndim, require_orientation=True) if fixed_seg else None,
    )


NORMALIZE_CHOICES = ("model", "none", "minmax", "percentile")

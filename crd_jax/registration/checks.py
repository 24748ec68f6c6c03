"""What registration refuses before it computes (one line naming the file and the problem) and what it
warns about after: inputs too small, constant, too anisotropic or apart in world space; a field of view the
model's grid cannot see; label maps on another grid; intensities unlike the model's training data; NaN/Inf
results; inputs that look not pre-aligned."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from crd_jax.data.io import Volume
from crd_jax.errors import InputError
from crd_jax.registration import space
from crd_jax.registration.space import same_grid, world_gap


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


def check_field_of_view(loaded, volumes, voxel=None, work=None) -> None:
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


def check_model_grid(loaded, fixed: Volume, moving: Volume) -> None:
    """:func:`check_field_of_view` for a pair, before any computation."""
    pre = loaded.spec.get("preprocessing", {})
    record = pre.get("geometry")
    if record and fixed.data.ndim == 3:
        try:
            voxel = space.model_voxel_size(record, pre)
            vols = [space.to_model_space(v, record["orientation"])[0] for v in (fixed, moving)]
        except (KeyError, ValueError, TypeError) as exc:
            raise InputError(loaded.path, f"unusable geometry record in model.json ({exc})") from None
        check_field_of_view(loaded, vols, voxel, space.model_work_shape(vols[0], voxel))
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
    (llo, lhi), (ilo, ihi) = space.world_box(labels), space.world_box(image)
    gap = float(np.max(np.abs(np.concatenate([llo - ilo, lhi - ihi]))))
    if gap > 0.5 * min(image.spacing):
        raise InputError(labels.path, f"label map lies on another grid than the {what} {image.path}: their world boxes "
                                      f"differ by up to {gap:.1f} mm (check the affines; labels must cover the same voxels)")


def check_intensities(loaded, image: np.ndarray, path, mode: str) -> None:
    """The network input must look like what the model was trained on (the model stores the 99th percentile
    of its training inputs; models without it were trained on [0, 1] images)."""
    reference = float(loaded.spec.get("preprocessing", {}).get("intensity", {}).get("p99", 1.0))
    p99 = float(np.percentile(image, 99))
    if reference > 0 and not (reference / INTENSITY_RATIO <= p99 <= reference * INTENSITY_RATIO):
        hint = " pass --normalize minmax (or percentile) to rescale it" if mode == "none" else ""
        raise InputError(path, f"intensities (99th percentile {p99:.4g}) are far from the model's training data "
                               f"({reference:.4g});{hint or ' rescale the image'}")


def check_finite(name: str, array: np.ndarray, model_path) -> None:
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise InputError(model_path, f"the model produced {bad} NaN/Inf values in the {name}; nothing was written")


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
        along = lambda a, n: jnp.arange(n, dtype=jnp.float32).reshape([-1 if k == a else 1 for k in range(data.ndim)])  # noqa: E731
        return np.array([float(jnp.sum(mask * along(a, n)) / total) for a, n in enumerate(data.shape)])

    return float(np.linalg.norm((centroid(fixed.data) - centroid(moving_data)) * spacing))


def mean_displacement_mm(disp, fixed: Volume) -> float:
    """The mean length in mm of a displacement (fixed grid, voxels) over the fixed image's foreground (voxels
    above a tenth of its intensity range): the check of :data:`MISALIGNED_MM`."""
    data = np.asarray(fixed.data)
    lo, hi = float(data.min()), float(data.max())
    mask = jnp.asarray(data > lo + 0.1 * (hi - lo))
    length = jnp.sqrt(jnp.sum((jnp.asarray(disp, jnp.float32) * jnp.asarray(fixed.spacing, jnp.float32)) ** 2, axis=-1))
    return float(jnp.sum(jnp.where(mask, length, 0.0)) / jnp.maximum(jnp.sum(mask), 1))


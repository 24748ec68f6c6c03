"""What registration refuses before it computes (one line naming the file and the problem) and what it
warns about after: inputs too small, constant, too anisotropic or apart in world space; a field of view the
model's grid cannot see; label maps on another grid; intensities unlike the model's training data; NaN/Inf
results; inputs that look not pre-aligned; inputs that look out of the model's training domain (a warning, once
per process)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from crd_jax.data.io import Volume
from crd_jax.errors import InputError
from crd_jax.registration import space
from crd_jax.registration.space import same_grid, world_gap

if TYPE_CHECKING:
    import jax

    from crd_jax.data.io import PathLike
    from crd_jax.registration.model import LoadedModel


MIN_SIDE = 16  # voxels: below this a 4-level network sees a few voxels and nothing meaningful registers
MAX_ANISOTROPY = 20.0  # largest / smallest voxel side: beyond this a slab of thick slices, not a volume
INTENSITY_RATIO = 4.0  # how far the input's 99th percentile may be from the training data's


def check_images(fixed: Volume, moving: Volume) -> None:
    """Refuses pairs that would give meaningless output with exit 0: tiny, constant, or non-overlapping."""
    for vol in (fixed, moving):
        if min(vol.data.shape) < MIN_SIDE:
            raise InputError(
                vol.path,
                f"image of {'x'.join(map(str, vol.data.shape))} voxels is too small to register (at least {MIN_SIDE} per side)",
            )
        lo, hi = float(vol.data.min()), float(vol.data.max())
        if hi <= lo:
            raise InputError(vol.path, f"image is constant (every voxel is {lo:g}): nothing to register")
        spacing = np.asarray(vol.spacing)
        if spacing.max() > MAX_ANISOTROPY * spacing.min():
            raise InputError(
                vol.path,
                f"voxels of {' x '.join(f'{v:g}' for v in spacing)} mm are too anisotropic to "
                f"register ({spacing.max() / spacing.min():.0f}:1, at most {MAX_ANISOTROPY:g}:1); "
                "resample the image to near-isotropic voxels first",
            )
    gap = world_gap(fixed, moving)
    if gap > 0:
        raise InputError(
            moving.path,
            f"does not overlap the fixed image {fixed.path} in world space: their boxes are "
            f"{gap:.1f} mm apart (check the affines, or align the images first)",
        )


MAX_WORK_SIDE = 1024  # voxels per side of the model's grid: beyond this a model.json or an image is wrong
MAX_WORK_VOXELS = 1 << 27


def check_field_of_view(
    loaded: LoadedModel,
    volumes: Sequence[Volume],
    voxel: Optional[Sequence[float]] = None,
    work: Optional[Tuple[int, ...]] = None,
) -> None:
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
            raise InputError(
                vol.path,
                f"field of view too small for this model: {fov} mm is "
                f"{'x'.join(map(str, seen))} voxels at the model's voxel size "
                f"({'x'.join(f'{v:g}' for v in (voxel or vol.spacing))} mm; at least {MIN_SIDE} per side)",
            )
    if work is not None and min(int(w) for w in work) < MIN_SIDE:
        raise InputError(
            volumes[0].path,
            f"field of view too small for this model: it reaches the network as "
            f"{'x'.join(str(int(w)) for w in work)} voxels (at least {MIN_SIDE} per side)",
        )
    if work is not None and (max(int(w) for w in work) > MAX_WORK_SIDE or int(np.prod([int(w) for w in work])) > MAX_WORK_VOXELS):
        raise InputError(
            loaded.path,
            f"the model's grid for this image would be {'x'.join(map(str, work))} voxels "
            f"(at most {MAX_WORK_SIDE} per side): check model.json's geometry and resample_shape",
        )


def check_model_grid(loaded: LoadedModel, fixed: Volume, moving: Volume) -> None:
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
        raise InputError(
            labels.path,
            f"label map lies on another grid than the {what} {image.path}: their world boxes "
            f"differ by up to {gap:.1f} mm (check the affines; labels must cover the same voxels)",
        )


def check_intensities(loaded: LoadedModel, image: np.ndarray, path: PathLike, mode: str) -> None:
    """The network input must look like what the model was trained on (the model stores the 99th percentile
    of its training inputs; models without it were trained on [0, 1] images)."""
    reference = float(loaded.spec.get("preprocessing", {}).get("intensity", {}).get("p99", 1.0))
    p99 = float(np.percentile(image, 99))
    if reference > 0 and not (reference / INTENSITY_RATIO <= p99 <= reference * INTENSITY_RATIO):
        hint = " pass --normalize minmax (or percentile) to rescale it" if mode == "none" else ""
        raise InputError(
            path,
            f"intensities (99th percentile {p99:.4g}) are far from the model's training data "
            f"({reference:.4g});{hint or ' rescale the image'}",
        )


def check_finite(name: str, array: np.ndarray, model_path: PathLike) -> None:
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise InputError(model_path, f"the model produced {bad} NaN/Inf values in the {name}; nothing was written")


# The not-pre-aligned check (one warning line), set from LPBA40 validation pairs (affinely aligned, 1 mm; the
# first 10 of benchmarks/register_options.py, which counts the warnings: none there, 4 of 4 rotated inputs)
AFFINE_MOVED_MM = 10.0  # the affine step's mean displacement of the fixed foreground; those pairs: at most 6.6 mm
CENTROIDS_MM = 8.0  # the distance of the two foregrounds' centroids the network sees; those pairs: at most 4.2 mm


def centroid_distance_mm(fixed: Volume, moving_data: np.ndarray) -> float:
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


def mean_displacement_mm(disp: np.ndarray | jax.Array, fixed: Volume) -> float:
    """The mean length in mm of a displacement (fixed grid, voxels) over the fixed image's foreground (voxels
    above a tenth of its intensity range): the check of :data:`MISALIGNED_MM`."""
    data = np.asarray(fixed.data)
    lo, hi = float(data.min()), float(data.max())
    mask = jnp.asarray(data > lo + 0.1 * (hi - lo))
    length = jnp.sqrt(jnp.sum((jnp.asarray(disp, jnp.float32) * jnp.asarray(fixed.spacing, jnp.float32)) ** 2, axis=-1))
    return float(jnp.sum(jnp.where(mask, length, 0.0)) / jnp.maximum(jnp.sum(mask), 1))


# The out-of-domain check (one warning line, once per process), for models that record their training space
# (``preprocessing.geometry``). Per axis, in the model's orientation: the input's voxel size and its field of view
# (shape x voxel size) within [1/DOMAIN_RATIO, DOMAIN_RATIO] of the training data's (``stored_shape x spacing``).
DOMAIN_RATIO = 2.0
# The intensity histogram, as one statistic: the median of the foreground (voxels above a tenth of the 99th
# percentile) over the 99th percentile. It does not depend on the intensity scale or on how much background the
# field of view holds; a skull-stripped T1 image gives about 0.7-0.8, other contrasts, heads with skull and fat,
# masks or noise give other values. A model records its own in ``preprocessing.intensity.fg_median_ratio``; models
# without one were trained on the shipped models' data: LPBA40 S11-S34 (their training subjects, images as
# stored) give 0.694-0.815, median 0.795, the default below. The warning fires beyond +-0.15 of the model's value
# (about the spread of those 24 training images, 0.12, with a margin); no held-out image set these numbers.
FG_MEDIAN_RATIO = 0.795
FG_MEDIAN_TOLERANCE = 0.15
_domain_warned: set = set()  # models (paths) that have warned in this process


def foreground_median_ratio(data: np.ndarray) -> float:
    """The intensity statistic of :data:`FG_MEDIAN_RATIO` on every second voxel per axis (the percentiles of an
    eighth of a brain image are the whole image's to about 1e-3); NaN for an image without positive values."""
    sample = np.asarray(data)[tuple(slice(None, None, 2) for _ in range(np.ndim(data)))]
    p99 = float(np.percentile(sample, 99))
    if not p99 > 0:
        return float("nan")
    return float(np.median(sample[sample > 0.1 * p99])) / p99


def out_of_domain(spec: Mapping, volumes: Sequence[Volume]) -> Optional[str]:
    """Why the first of ``volumes`` that looks out of the training domain of the model ``spec`` does (a phrase),
    or ``None``; ``None`` also for a model without a geometry record (nothing to compare with)."""
    pre = spec.get("preprocessing", {})
    record = pre.get("geometry")
    if not record or any(v.data.ndim != 3 for v in volumes):
        return None
    codes = record["orientation"]
    ref_spacing = np.asarray(record["spacing"], np.float64)
    ref_fov = np.asarray(record["stored_shape"], np.float64) * ref_spacing
    ref_ratio = float(pre.get("intensity", {}).get("fg_median_ratio", FG_MEDIAN_RATIO))
    mm = lambda v: " x ".join(f"{x:.3g}" for x in v)  # noqa: E731
    outside = lambda r: bool(np.any((r < 1 / DOMAIN_RATIO) | (r > DOMAIN_RATIO)))  # noqa: E731
    band = f"per axis outside [{1 / DOMAIN_RATIO:g}, {DOMAIN_RATIO:g}] of it"
    for vol in volumes:
        seen = space.to_model_space(vol, codes)[0]  # a view: axes permuted into the model's orientation
        spacing = np.asarray(seen.spacing, np.float64)
        if outside(spacing / ref_spacing):
            return f"{vol.path}: voxels of {mm(spacing)} mm ({codes}) against the training data's {mm(ref_spacing)} mm, {band}"
        fov = np.asarray(seen.data.shape, np.float64) * spacing
        if outside(fov / ref_fov):
            return f"{vol.path}: a field of view of {mm(fov)} mm ({codes}) against the training data's {mm(ref_fov)} mm, {band}"
        ratio = foreground_median_ratio(vol.data)
        if not abs(ratio - ref_ratio) <= FG_MEDIAN_TOLERANCE:
            return (
                f"{vol.path}: an intensity histogram unlike the training data's (foreground median / 99th "
                f"percentile {ratio:.2f} against {ref_ratio:.2f}, beyond +-{FG_MEDIAN_TOLERANCE:g})"
            )
    return None


def domain_warning_once(loaded: LoadedModel, volumes: Sequence[Volume]) -> Optional[str]:
    """The out-of-domain warning line for the first pair that looks out of the model's training domain, then
    ``None`` for the rest of the process (a batch of such pairs warns once); see :func:`out_of_domain`."""
    key = str(loaded.path)
    if key in _domain_warned:
        return None
    reason = out_of_domain(loaded.spec, volumes)
    if reason is None:
        return None
    _domain_warned.add(key)
    return (
        f"the input looks out of this model's training domain ({reason}); its results there are not what it "
        "was validated on (see docs/models.md; this warning is shown once per process)"
    )

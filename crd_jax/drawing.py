"""A figure per pair like the paper's Fig. 4: fixed, moving, warped with label overlap, deformed grid, error, in
radiological display orientation (patient right on the viewer's left)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from typing import TYPE_CHECKING, Sequence, Tuple

if TYPE_CHECKING:
    from crd_jax.data.io import PathLike, Volume

import numpy as np

from crd_jax.data.io import atomic_path


# rows of a 3-D figure: (name, the axis held fixed, what the panel's left/right/top/bottom edges face) on a RAS array
PLANES = (("axial", 2, "RLAP"), ("coronal", 1, "RLSI"), ("sagittal", 0, "APSI"))


def to_display(affine: np.ndarray, volumes: dict, disp: Optional[np.ndarray] = None) -> tuple:
    """The arrays reoriented to RAS (axes permuted and flipped, no resampling) and the voxel displacement ``disp``
    (on the same grid) expressed in the reoriented voxels, for drawing in radiological orientation."""
    import nibabel.orientations as ornt

    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("R", "A", "S")))
    out = {k: (None if v is None else ornt.apply_orientation(np.asarray(v), transform)) for k, v in volumes.items()}
    if disp is not None:
        shape = np.asarray(disp).shape[:3]
        new_affine = affine @ ornt.inv_ornt_aff(transform, shape)
        m = np.linalg.solve(new_affine[:3, :3], affine[:3, :3])  # original voxel components -> reoriented ones
        moved = np.asarray(disp, np.float32) @ m.T.astype(np.float32)
        disp = np.stack([ornt.apply_orientation(moved[..., k], transform) for k in range(3)], -1)
    return out, disp


def _slices(volume: np.ndarray):
    """The mid-slices of a RAS volume in radiological display order (rows of :data:`PLANES`), each ``(h, v)``
    with the horizontal axis flipped (patient right on the viewer's left; anterior on the left in the sagittal
    row) so that ``imshow(s.T, origin="lower")`` draws it; a 2-D image is its own single slice."""
    if volume.ndim == 2:
        return [volume]
    centre = [s // 2 for s in volume.shape[:3]]
    return [np.take(volume, centre[a], axis=a)[::-1] for _, a, _ in PLANES]


def _field_slices(disp: np.ndarray):
    """In-plane components of the field on each mid-slice of :func:`_slices` (the flipped axis negated)."""
    if disp.shape[-1] == 2:
        return [disp]
    centre = [s // 2 for s in disp.shape[:3]]
    out = []
    for _, a, _ in PLANES:
        plane = [k for k in range(3) if k != a]
        f = np.take(disp, centre[a], axis=a)[..., plane][::-1].copy()
        f[..., 0] *= -1
        out.append(f)
    return out


def _labels_rgb(image: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Grey image with each label in its own colour (40% opacity)."""
    import matplotlib

    grey = (image - image.min()) / max(float(np.ptp(image)), 1e-8)
    rgb = np.stack([grey] * 3, -1) * 0.8
    fg = seg > 0
    colours = np.asarray(matplotlib.colormaps["tab20"](np.arange(20)))[:, :3]
    rgb[fg] = 0.6 * rgb[fg] + 0.4 * colours[(np.asarray(seg)[fg].astype(np.int64) * 7) % 20]
    return np.clip(rgb, 0, 1)


def _overlap_rgb(image: np.ndarray, warped_seg: np.ndarray, fixed_seg: np.ndarray) -> np.ndarray:
    """Grey image; voxels where the warped and fixed labels agree (foreground) in red, disagree in blue."""
    grey = (image - image.min()) / max(float(np.ptp(image)), 1e-8)
    rgb = np.stack([grey] * 3, -1) * 0.6
    fg = (warped_seg > 0) | (fixed_seg > 0)
    agree = fg & (warped_seg == fixed_seg)
    rgb[agree] = 0.6 * rgb[agree] + 0.4 * np.array([1.0, 0.1, 0.1])
    rgb[fg & ~agree] = 0.6 * rgb[fg & ~agree] + 0.4 * np.array([0.1, 0.3, 1.0])
    return np.clip(rgb, 0, 1)


def display_spacing(affine: np.ndarray) -> Tuple[float, ...]:
    """The voxel size (mm) along the axes of the RAS arrays of :func:`to_display`."""
    import nibabel.orientations as ornt

    transform = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("R", "A", "S")))
    linear = (affine @ ornt.inv_ornt_aff(transform, (2, 2, 2)))[:3, :3]
    return tuple(float(v) for v in np.sqrt((linear**2).sum(axis=0)))


def _grid(ax, field: np.ndarray, step: int = 4, aspect: float = 1.0) -> None:
    """Lines of the regular grid moved by the in-plane field; drawn like the images (x: axis 0, y: axis 1)."""
    h, w = field.shape[:2]
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x, y = ii + field[..., 0], jj + field[..., 1]
    for r in range(0, h, step):
        ax.plot(x[r], y[r], color="k", lw=0.5)
    for c in range(0, w, step):
        ax.plot(x[:, c], y[:, c], color="k", lw=0.5)
    ax.set_xlim(-0.5, h - 0.5)
    ax.set_ylim(-0.5, w - 0.5)
    ax.set_aspect(aspect)


def pair_figure(
    path: PathLike,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    disp: np.ndarray,
    fixed_seg: Optional[np.ndarray] = None,
    warped_seg: Optional[np.ndarray] = None,
    title: str = "",
    spacing: Optional[Sequence[float]] = None,
) -> None:
    """Writes a PNG or PDF (by the suffix): rows = mid-slices (axial, coronal, sagittal of RAS arrays, see
    :func:`to_display`, drawn in radiological orientation), columns = fixed | moving | warped (+ the label
    overlap with a legend when both label maps are given, the warped labels alone when only they are) | grid |
    error (with a colour bar). ``spacing``: the voxel size of those arrays (mm), so that millimetres are square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _slices(fixed)
    overlap = fixed_seg is not None and warped_seg is not None
    warped_title = "warped" + (" (label overlap)" if overlap else " + warped labels" if warped_seg is not None else "")
    cols = ["fixed", "moving", warped_title, "deformed grid", "error (warped - fixed)"]
    fig, axes = plt.subplots(len(rows), 5, figsize=(15, 3.2 * len(rows)), squeeze=False)
    f_s, m_s, w_s, d_s = _slices(fixed), _slices(moving), _slices(warped), _field_slices(disp)
    fs_s = _slices(fixed_seg) if fixed_seg is not None else None
    ws_s = _slices(warped_seg) if warped_seg is not None else None
    vmax = float(max(np.abs(fixed).max(), 1e-8))
    for r in range(len(rows)):
        ax = axes[r]
        aspect = 1.0  # height / width of a voxel on the screen: square millimetres
        if spacing is not None and len(rows) == 3:
            h, v = [k for k in range(3) if k != PLANES[r][1]]
            aspect = spacing[v] / spacing[h]
        ax[0].imshow(f_s[r].T, cmap="gray", origin="lower", aspect=aspect)
        ax[1].imshow(m_s[r].T, cmap="gray", origin="lower", aspect=aspect)
        if overlap:
            ax[2].imshow(np.transpose(_overlap_rgb(w_s[r], ws_s[r], fs_s[r]), (1, 0, 2)), origin="lower", aspect=aspect)
        elif ws_s is not None:
            ax[2].imshow(np.transpose(_labels_rgb(w_s[r], ws_s[r]), (1, 0, 2)), origin="lower", aspect=aspect)
        else:
            ax[2].imshow(w_s[r].T, cmap="gray", origin="lower", aspect=aspect)
        _grid(ax[3], d_s[r], aspect=aspect)
        error = ax[4].imshow((w_s[r] - f_s[r]).T, cmap="bwr", vmin=-vmax / 2, vmax=vmax / 2, origin="lower", aspect=aspect)
        fig.colorbar(error, ax=ax[4], fraction=0.046, pad=0.04, label="intensity difference")
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
        if len(rows) == 3:
            name, axis, edges = PLANES[r]
            ax[0].set_ylabel(f"{name} (slice {fixed.shape[axis] // 2})", fontsize=10)
            for a in ax[:3]:
                for (x, y, ha, va), letter in zip(
                    (
                        (0.02, 0.5, "left", "center"),
                        (0.98, 0.5, "right", "center"),
                        (0.5, 0.98, "center", "top"),
                        (0.5, 0.02, "center", "bottom"),
                    ),
                    edges,
                ):
                    a.text(x, y, letter, transform=a.transAxes, ha=ha, va=va, color="yellow", fontsize=8)
        if r == 0:
            for a, name in zip(ax, cols):
                a.set_title(name, fontsize=10)
    if overlap:
        from matplotlib.patches import Patch

        handles = [Patch(color=(1.0, 0.1, 0.1), label="labels agree"), Patch(color=(0.1, 0.3, 1.0), label="labels disagree")]
        fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="pdf" if path.suffix.lower() == ".pdf" else "png")
    plt.close(fig)


# --- drawing a saved registration: `figure --from OUT_DIR` and `register --qc` --------------------------------------

#: the displacement files a registration folder may hold, in the order they are looked for
SAVED_DISPLACEMENTS = ("disp.nii.gz", "disp.nii", "disp_itk.nii.gz", "disp_itk.nii", "disp_compact.npz")


def saved_registration(
    folder: PathLike,
    fixed_path: Optional[PathLike] = None,
    moving_path: Optional[PathLike] = None,
    fixed_seg_path: Optional[PathLike] = None,
    disp_path: Optional[PathLike] = None,
) -> tuple:
    """What a figure of a saved ``crd-jax register`` output folder draws, read from its files (no model is
    loaded, nothing is registered): the fixed and moving images named by its ``registration.json`` (or
    ``fixed_path``/``moving_path``), its ``warped``, ``warped_seg`` (when present) and displacement (the
    folder's own, any format register writes, or ``disp_path``: the Learn2Reg layout's flat file), and the
    fixed labels of ``fixed_seg_path``. Returns ``(fixed, moving_shown, warped, disp, fixed_seg, warped_seg,
    title)``: ``fixed`` a Volume, the others arrays on its grid. Bad input is one :class:`InputError` line."""
    import json

    from crd_jax.data.io import load_image, load_labels
    from crd_jax.errors import InputError
    from crd_jax.interop.formats import read_displacement
    from crd_jax.registration import compact
    from crd_jax.registration.pipeline import labels_on_grid
    from crd_jax.registration.space import onto_grid, same_grid

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "no such folder (--from takes the --out-dir of crd-jax register)")
    record = {}
    if (folder / "registration.json").is_file():
        try:
            record = json.loads((folder / "registration.json").read_text())
            assert isinstance(record, dict)
        except (OSError, ValueError, UnicodeDecodeError, AssertionError):
            raise InputError(folder / "registration.json", "unreadable registration record (not a JSON object)") from None

    def first(*names):
        return next((folder / n for n in names if (folder / n).is_file()), None)

    for key in ("fixed", "moving"):
        if record.get(key) is not None and not isinstance(record[key], str):
            raise InputError(folder / "registration.json", f"its {key!r} is not a file name: {record[key]!r:.60}")
    fixed_path, moving_path = fixed_path or record.get("fixed"), moving_path or record.get("moving")
    if not (fixed_path and moving_path):
        raise InputError(folder, "no registration.json naming the fixed and moving images; pass --fixed and --moving")
    warped_path = first("warped.nii.gz", "warped.nii")
    disp_path = disp_path or first(*SAVED_DISPLACEMENTS) or next(iter(sorted(folder.glob("disp_[0-9]*_[0-9]*.nii*"))), None)
    if warped_path is None or disp_path is None:
        raise InputError(
            folder,
            "not a crd-jax register output folder (no warped.nii[.gz] and no displacement: "
            "disp[_itk].nii[.gz], disp_compact.npz or disp_FFFF_MMMM.nii[.gz])",
        )
    fixed = load_image(fixed_path, require_orientation=True)
    moving = load_image(moving_path, require_orientation=True)
    warped = load_image(warped_path)
    if warped.data.shape != fixed.data.shape:
        raise InputError(
            warped_path,
            f"shape {warped.data.shape} differs from the fixed image's {fixed.data.shape} "
            f"({fixed_path}): not this pair's registration",
        )
    if compact.is_compact(disp_path):
        disp, _ = compact.expand(disp_path)
        if disp.shape[:-1] != fixed.data.shape:
            raise InputError(disp_path, f"grid {disp.shape[:-1]} differs from the fixed image's {fixed.data.shape}")
    else:
        disp = read_displacement(disp_path, fixed)
    seg_path = first("warped_seg.nii.gz", "warped_seg.nii")
    warped_seg = load_labels(seg_path).data if seg_path is not None else None
    if warped_seg is not None and warped_seg.shape != fixed.data.shape:
        raise InputError(seg_path, f"shape {warped_seg.shape} differs from the fixed image's {fixed.data.shape}")
    fixed_seg = labels_on_grid(load_labels(fixed_seg_path, require_orientation=True) if fixed_seg_path else None, fixed)
    moving_shown = moving.data if same_grid(fixed, moving) else onto_grid(moving, fixed, order=1)
    label = record.get("model_label", "")
    title = f"{Path(moving_path).name} -> {Path(fixed_path).name}" + (f" ({label})" if label else "")
    return fixed, moving_shown, warped.data, disp, fixed_seg, warped_seg, title


def draw_pair(
    path: PathLike,
    fixed: Volume,
    moving_shown: np.ndarray,
    warped: np.ndarray,
    disp: np.ndarray,
    fixed_seg: Optional[np.ndarray] = None,
    warped_seg: Optional[np.ndarray] = None,
    title: str = "",
) -> None:
    """:func:`pair_figure` of a pair on ``fixed``'s grid (a Volume; the arrays on its grid), a 3-D pair first
    reoriented to RAS (:func:`to_display`) and drawn with square millimetres."""
    volumes = {"fixed": fixed.data, "moving": moving_shown, "warped": warped, "fixed_seg": fixed_seg, "warped_seg": warped_seg}
    spacing = None
    if fixed.data.ndim == 3:
        spacing = display_spacing(fixed.affine)
        volumes, disp = to_display(fixed.affine, volumes, disp)
    pair_figure(
        path,
        volumes["fixed"],
        volumes["moving"],
        volumes["warped"],
        disp,
        volumes["fixed_seg"],
        volumes["warped_seg"],
        title=title,
        spacing=spacing,
    )


def draw_saved(
    path: PathLike, folder: PathLike, fixed_seg_path: Optional[PathLike] = None, disp_path: Optional[PathLike] = None
) -> None:
    """The figure of the registration saved in ``folder`` (:func:`saved_registration`) written to ``path``:
    what ``crd-jax figure --from FOLDER [--fixed-seg ...]`` draws, and ``register --qc``'s ``qc.png``."""
    fixed, moving_shown, warped, disp, fixed_seg, warped_seg, title = saved_registration(
        folder, fixed_seg_path=fixed_seg_path, disp_path=disp_path
    )
    draw_pair(path, fixed, moving_shown, warped, disp, fixed_seg, warped_seg, title)

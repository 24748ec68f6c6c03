"""A figure per pair like the paper's Fig. 4: fixed, moving, warped with label overlap, deformed grid, error."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from crd_jax.data.io import atomic_path


def _slices(volume: np.ndarray):
    """The three orthogonal mid-slices of a 3-D volume (a 2-D image is its own single slice)."""
    if volume.ndim == 2:
        return [volume]
    centre = [s // 2 for s in volume.shape[:3]]
    return [np.take(volume, centre[a], axis=a) for a in range(3)]


def _field_slices(disp: np.ndarray):
    """In-plane components of the field on each mid-slice."""
    if disp.shape[-1] == 2:
        return [disp]
    centre = [s // 2 for s in disp.shape[:3]]
    out = []
    for a in range(3):
        plane = [k for k in range(3) if k != a]
        out.append(np.take(disp, centre[a], axis=a)[..., plane])
    return out


def _overlap_rgb(image: np.ndarray, warped_seg: np.ndarray, fixed_seg: np.ndarray) -> np.ndarray:
    """Grey image; voxels where the warped and fixed labels agree (foreground) in red, disagree in blue."""
    grey = (image - image.min()) / max(float(np.ptp(image)), 1e-8)
    rgb = np.stack([grey] * 3, -1) * 0.6
    fg = (warped_seg > 0) | (fixed_seg > 0)
    agree = fg & (warped_seg == fixed_seg)
    rgb[agree] = 0.6 * rgb[agree] + 0.4 * np.array([1.0, 0.1, 0.1])
    rgb[fg & ~agree] = 0.6 * rgb[fg & ~agree] + 0.4 * np.array([0.1, 0.3, 1.0])
    return np.clip(rgb, 0, 1)


def _grid(ax, field: np.ndarray, step: int = 4) -> None:
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
    ax.set_aspect("equal")


def pair_figure(path, fixed: np.ndarray, moving: np.ndarray, warped: np.ndarray, disp: np.ndarray,
                fixed_seg: Optional[np.ndarray] = None, warped_seg: Optional[np.ndarray] = None, title: str = "") -> None:
    """Writes a PNG or PDF (by the suffix): rows = mid-slices, columns = fixed | moving | warped (+ label
    overlap, with a legend) | grid | error (with a colour bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _slices(fixed)
    cols = ["fixed", "moving", "warped" + (" (label overlap)" if fixed_seg is not None else ""), "deformed grid",
            "error (warped - fixed)"]
    fig, axes = plt.subplots(len(rows), 5, figsize=(15, 3.2 * len(rows)), squeeze=False)
    f_s, m_s, w_s, d_s = _slices(fixed), _slices(moving), _slices(warped), _field_slices(disp)
    fs_s = _slices(fixed_seg) if fixed_seg is not None else None
    ws_s = _slices(warped_seg) if warped_seg is not None else None
    vmax = float(max(np.abs(fixed).max(), 1e-8))
    for r in range(len(rows)):
        ax = axes[r]
        ax[0].imshow(f_s[r].T, cmap="gray", origin="lower")
        ax[1].imshow(m_s[r].T, cmap="gray", origin="lower")
        if fs_s is not None and ws_s is not None:
            ax[2].imshow(np.transpose(_overlap_rgb(w_s[r], ws_s[r], fs_s[r]), (1, 0, 2)), origin="lower")
        else:
            ax[2].imshow(w_s[r].T, cmap="gray", origin="lower")
        _grid(ax[3], d_s[r])
        error = ax[4].imshow((w_s[r] - f_s[r]).T, cmap="bwr", vmin=-vmax / 2, vmax=vmax / 2, origin="lower")
        fig.colorbar(error, ax=ax[4], fraction=0.046, pad=0.04, label="intensity difference")
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
        if r == 0:
            for a, name in zip(ax, cols):
                a.set_title(name, fontsize=10)
    if fs_s is not None and ws_s is not None:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=(1.0, 0.1, 0.1), label="labels agree"), Patch(color=(0.1, 0.3, 1.0), label="labels disagree")],
                   loc="lower center", ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="pdf" if path.suffix.lower() == ".pdf" else "png")
    plt.close(fig)

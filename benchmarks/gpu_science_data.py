"""The data ``benchmarks/gpu_science.sh`` carries to a lent GPU: every LPBA40 subject resampled once to the
paper's 128x128x128 (images linear, labels nearest; ``crd_jax.data.preprocess.resample``, the resampler
training uses) and stored as uint8 NIfTI (images with scl_slope/scl_inter, so intensities come back to within
1/255 of their range; labels exactly), about 20 MB for 30 subjects, in ``.gpu_science/data`` (git-ignored).

    python benchmarks/gpu_science_data.py --data-root /path/to/lpba40
    python benchmarks/gpu_science_data.py --small        # 30 synthetic 32^3 subjects: the CPU dry run's data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
DEFAULT = ROOT / ".gpu_science" / "data"
SHAPE = (128, 128, 128)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, scaled: bool) -> None:
    import nibabel as nib

    from crd_jax.data.io import atomic_path, write_nifti_stream

    if scaled:
        lo, hi = float(data.min()), float(data.max())
        slope = (hi - lo) / 255.0 if hi > lo else 1.0
        q = np.clip(np.rint((data - lo) / slope), 0, 255).astype(np.uint8)
        img = nib.Nifti1Image(q, affine)
        img.header.set_slope_inter(slope, lo)
    else:
        if data.min() < 0 or data.max() > 255:
            raise SystemExit(f"{path.name}: label values outside 0..255")
        q = data.astype(np.uint8)
        img = nib.Nifti1Image(q, affine)
        img.header.set_slope_inter(1.0, 0.0)
    img.set_data_dtype(np.uint8)
    with atomic_path(path) as tmp:
        write_nifti_stream(tmp, img, q, compress=True, level=9)


def prepare_lpba40(root: Path, dest: Path) -> int:
    import nibabel as nib

    from crd_jax.data.preprocess import resample

    images = sorted((root / "images").glob("*.nii*"))
    if not images:
        raise SystemExit(f"{root}: no images/*.nii*")
    for path in images:
        name = path.name.split(".")[0]
        img = nib.load(str(path))
        seg = nib.load(str(root / "labels" / path.name))
        scale = np.diag([s / t for s, t in zip(img.shape[:3], SHAPE)] + [1.0])
        affine = img.affine @ scale  # voxel centres of the new grid span the same box
        affine[:3, 3] += img.affine[:3, :3] @ ((np.diag(scale)[:3] - 1) / 2)
        _save(dest / "images" / f"{name}.nii.gz", resample(np.asarray(img.dataobj, np.float32), SHAPE, 1), affine, True)
        _save(dest / "labels" / f"{name}.nii.gz", resample(np.asarray(seg.dataobj), SHAPE, 0), affine, False)
    return len(images)


def prepare_small(dest: Path, count: int = 30, shape=(32, 32, 32)) -> int:
    from crd_jax.data.synthetic import SyntheticConfig, SyntheticDataset

    ds = SyntheticDataset(SyntheticConfig(shape=shape, num_subjects=count, num_labels=8, max_displacement=2.0))
    for i in range(count):
        name = f"S{11 + i:02d}"
        _save(dest / "images" / f"{name}.nii.gz", np.asarray(ds.image(i), np.float32), np.eye(4), True)
        _save(dest / "labels" / f"{name}.nii.gz", np.asarray(ds.labels(i)), np.eye(4), False)
    return count


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--dest", type=Path, default=None)
    p.add_argument("--small", action="store_true")
    args = p.parse_args()
    dest = args.dest or (DEFAULT.parent / "small" if args.small else DEFAULT)
    n = prepare_small(dest) if args.small else prepare_lpba40(args.data_root or ROOT.parent / "shared" / "data" / "lpba40", dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{n} subjects -> {dest} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

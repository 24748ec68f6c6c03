"""ITK composite transforms (issue 28, item 3): ``register --disp-format itk`` writes ``composite.h5``, which
SimpleITK (and ANTs, where antspyx is installed) applies to the moving image to give crd-jax's ``warped.nii.gz``,
and which ``crd-jax apply`` reads back.

The geometry in every test: oblique (rotated about three axes), anisotropic grids, fixed and moving on different
grids, a smooth synthetic image (sums of sines of the world position), a non-trivial field and affine."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from pathlib import Path
from scipy.spatial.transform import Rotation

sitk = pytest.importorskip("SimpleITK")

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
WAVE_MM = 9.0  # the smallest wavelength scale of the test image: |f''| <= 1 / WAVE_MM^2 per axis term


def oblique(spacing, angles, origin) -> np.ndarray:
    """A RAS affine: a rotation (degrees about x, y, z) times anisotropic voxel sizes, then the origin."""
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    out[:3, 3] = origin
    return out


def centred(affine: np.ndarray, shape, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """``affine`` moved so that the grid's centre voxel lies at ``centre`` (mm)."""
    out = affine.copy()
    out[:3, 3] = np.asarray(centre) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return out


def smooth(world: np.ndarray) -> np.ndarray:
    """A smooth image of the world position (mm): |d2f/dx_k^2| <= 1 / WAVE_MM^2 for each axis."""
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    return (np.sin(x / WAVE_MM) + np.cos(y / WAVE_MM) * np.sin(z / WAVE_MM) + 2.0).astype(np.float32)


def grid(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)


def world_of(shape, affine) -> np.ndarray:
    return grid(shape) @ affine[:3, :3].T + affine[:3, 3]


def to_sitk(data: np.ndarray, affine: np.ndarray):
    from crd_jax.interop.itk import lps_geometry

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    origin, spacing, direction = lps_geometry(affine)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def sitk_resample(moving: np.ndarray, moving_affine, fixed_shape, fixed_affine, transform_path) -> np.ndarray:
    """The moving image on the fixed grid through a transform file, by SimpleITK (linear, 0 outside)."""
    from crd_jax.interop.itk import array_of

    reference = to_sitk(np.zeros(fixed_shape, np.float32), fixed_affine)
    out = sitk.Resample(
        to_sitk(moving, moving_affine), reference, sitk.ReadTransform(str(transform_path)), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    return array_of(out)


def inside(points_world: np.ndarray, shape, affine, margin: float = 1.0) -> np.ndarray:
    """Where world points fall at least ``margin`` voxels inside a grid (border rules differ between tools)."""
    inv = np.linalg.inv(affine)
    vox = points_world @ inv[:3, :3].T + inv[:3, 3]
    return np.all((vox >= margin) & (vox <= np.asarray(shape) - 1 - margin), axis=-1)


def test_composite_reproduces_the_warp_sitk_applies_it_to_float32_rounding(tmp_path):
    """A non-trivial field with an affine after it, split into [affine, field] and written as composite.h5:
    SimpleITK's linear resampling of the moving image (on the fixed grid, one interpolation like crd-jax's warp)
    equals crd-jax's warp wherever both sample inside the image: tolerance 1e-4 on values in [1, 4] (float32
    rounding of positions and weights; measured ~5e-7)."""
    from crd_jax.interop.itk import write_composite
    from crd_jax.registration.warping import warp_image

    shape = (36, 30, 26)
    affine = oblique((1.2, 0.9, 1.6), (20, -15, 30), (-20.0, 15.0, -10.0))
    g = grid(shape)
    moving = smooth(world_of(shape, affine))
    deform = np.stack(
        [
            1.5 * np.sin(g[..., 0] / 6) + 0.5,
            np.cos(g[..., 1] / 5) * np.sin(g[..., 2] / 7),
            0.8 * np.sin((g[..., 0] + g[..., 2]) / 8),
        ],
        -1,
    )
    world = oblique((1.03, 0.98, 1.01), (2, -3, 4), (1.5, -2.0, 0.7))  # the affine pre-alignment, RAS fixed -> moving
    voxel = np.linalg.inv(affine) @ world @ affine
    positions = (g + deform) @ voxel[:3, :3].T + voxel[:3, 3]  # the affine after the deformable field
    disp = (positions - g).astype(np.float32)
    write_composite(tmp_path / "composite.h5", disp, affine, world)

    ours = warp_image(moving, disp)
    theirs = sitk_resample(moving, affine, shape, affine, tmp_path / "composite.h5")
    mask = inside(positions @ affine[:3, :3].T + affine[:3, 3], shape, affine)
    assert mask.mean() > 0.5
    assert np.abs(ours - theirs)[mask].max() < 1e-4

    # the file is ITK's composite layout, the affine first, read back as the same two parts
    read = sitk.ReadTransform(str(tmp_path / "composite.h5")).Downcast()
    assert [read.GetNthTransform(n).GetName() for n in range(read.GetNumberOfTransforms())] == [
        "AffineTransform",
        "DisplacementFieldTransform",
    ]
    raw = (tmp_path / "composite.h5").read_bytes()
    for name in (
        b"CompositeTransform_double_3_3",
        b"AffineTransform_double_3_3",
        b"DisplacementFieldTransform_double_3_3",
        b"TransformParameters",
        b"TransformFixedParameters",
    ):
        assert name in raw
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(
        np.reshape(read.GetNthTransform(0).Downcast().GetMatrix(), (3, 3)), lps @ world[:3, :3] @ lps, atol=1e-12
    )

    # and crd-jax reads it back as the same displacement
    from crd_jax.interop.itk import displacement_on_grid, read_transform

    np.testing.assert_allclose(displacement_on_grid(read_transform(tmp_path / "composite.h5"), shape, affine), disp, atol=1e-4)


def _crd(argv, cwd):
    return subprocess.run(
        [sys.executable, "-m", "crd_jax", *map(str, argv)], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600
    )


@pytest.fixture(scope="module")
def registered(tmp_path_factory, shift_model):
    """``crd-jax register --disp-format itk`` in a fresh process: fixed and moving on different oblique,
    anisotropic grids, the moving image a rotated and shifted copy (so the affine step does something)."""
    root = tmp_path_factory.mktemp("itk")
    f_shape, m_shape = (48, 40, 36), (40, 44, 34)
    f_aff = centred(oblique((1.1, 1.3, 1.5), (12, -8, 20), (0.0, 0.0, 0.0)), f_shape)
    m_aff = centred(oblique((1.4, 1.0, 1.25), (-10, 15, 5), (0.0, 0.0, 0.0)), m_shape, (-1.0, 2.0, 1.5))
    shift = oblique((1, 1, 1), (0, 0, 6), (2.0, -1.5, 1.0))
    fixed = smooth(world_of(f_shape, f_aff))
    moving = smooth(world_of(m_shape, m_aff) @ shift[:3, :3].T + shift[:3, 3])
    nib.save(nib.Nifti1Image(fixed, f_aff), str(root / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(moving, m_aff), str(root / "moving.nii.gz"))
    proc = _crd(
        [
            "register",
            "--model",
            shift_model,
            "--fixed",
            "fixed.nii.gz",
            "--moving",
            "moving.nii.gz",
            "--out-dir",
            "out",
            "--disp-format",
            "itk",
        ],
        root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "root": root,
        "fixed": fixed,
        "moving": moving,
        "f_aff": f_aff,
        "m_aff": m_aff,
        "f_shape": f_shape,
        "m_shape": m_shape,
    }


def _sample_points(r):
    """Where crd-jax samples the moving image for each fixed voxel (world, RAS), from disp_itk.nii.gz."""
    d = np.asarray(nib.load(str(r["root"] / "out" / "disp_itk.nii.gz")).dataobj, np.float64).reshape(*r["f_shape"], 3)
    return world_of(r["f_shape"], r["f_aff"]) + d * np.array([-1.0, -1.0, 1.0])


def _away_from_borders(r):
    """crd-jax's warp interpolates the moving image's samples at the fixed grid's voxels, which are 0 beyond the
    moving image and repeat the edge beyond the fixed grid; ITK samples the moving image itself (0 outside): they
    are compared where neither border is within reach."""
    points = _sample_points(r)
    return inside(points, r["m_shape"], r["m_aff"], margin=3.0) & inside(points, r["f_shape"], r["f_aff"], margin=1.0)


@pytest.mark.slow
def test_register_writes_a_composite_that_simpleitk_applies_like_warped_nii(registered):
    """SimpleITK resamples the original moving image once through composite.h5; crd-jax resampled it onto the
    fixed grid, then warped it (two linear interpolations). Tolerance: the bound on those interpolation errors
    for this image, |e| <= sum_k h_k^2 / 8 * max|f''| per interpolation (twice on the moving grid, once on the
    fixed grid), wherever both sample at least a voxel inside the moving image."""
    r = registered
    out = r["root"] / "out"
    assert {"composite.h5", "disp_itk.nii.gz", "warped.nii.gz", "affine_itk.txt"} <= {p.name for p in out.iterdir()}
    # the composite's affine is the affine step's (affine_itk.txt), the deformable field after it
    composite = sitk.ReadTransform(str(out / "composite.h5")).Downcast()
    step = sitk.ReadTransform(str(out / "affine_itk.txt"))
    probe = [(10.0, -5.0, 3.0), (-20.0, 15.0, 8.0), (0.0, 0.0, 0.0)]
    np.testing.assert_allclose(
        [composite.GetNthTransform(0).TransformPoint(p) for p in probe], [step.TransformPoint(p) for p in probe], atol=1e-5
    )
    warped = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj, np.float32)
    theirs = sitk_resample(r["moving"], r["m_aff"], r["f_shape"], r["f_aff"], out / "composite.h5")
    mask = _away_from_borders(r)
    assert mask.mean() > 0.4
    curvature = 3.0 / WAVE_MM**2  # |v^T H v| of the test image along any unit direction v
    bound = lambda spacing: sum(h * h for h in spacing) / 8 * curvature  # noqa: E731
    tol = 2 * bound((1.4, 1.0, 1.25)) + bound((1.1, 1.3, 1.5))
    diff = np.abs(warped - theirs)[mask]
    print(
        f"SimpleITK through composite.h5 vs warped.nii.gz: max |diff| {diff.max():.4g}, mean {diff.mean():.3g}, "
        f"tolerance {tol:.3g} (values {theirs[mask].min():.2f}..{theirs[mask].max():.2f})"
    )
    assert diff.max() < tol


@pytest.mark.slow
def test_apply_reads_the_composite_as_simpleitk_does(registered, tmp_path):
    """``crd-jax apply --transform composite.h5`` (one interpolation of the moving image, like SimpleITK):
    equal to SimpleITK's resampling to float32 rounding inside the image (1e-4), and to applying the same
    registration's disp_itk.nii.gz (the composite and the field are the same map)."""
    r = registered
    out = r["root"] / "out"
    for name, transform in (("h5.nii.gz", "out/composite.h5"), ("field.nii.gz", "out/disp_itk.nii.gz")):
        proc = _crd(
            [
                "apply",
                "--transform",
                transform,
                "--reference",
                "fixed.nii.gz",
                "--image",
                "moving.nii.gz",
                "--out",
                tmp_path / name,
            ],
            r["root"],
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    via_h5 = np.asarray(nib.load(str(tmp_path / "h5.nii.gz")).dataobj)
    via_field = np.asarray(nib.load(str(tmp_path / "field.nii.gz")).dataobj)
    theirs = sitk_resample(r["moving"], r["m_aff"], r["f_shape"], r["f_aff"], out / "composite.h5")
    mask = inside(_sample_points(r), r["m_shape"], r["m_aff"])
    assert np.abs(via_h5 - theirs)[mask].max() < 1e-4
    assert np.abs(via_h5 - via_field).max() < 1e-4


@pytest.mark.slow
def test_ants_applies_the_composite_like_simpleitk(registered):
    """antsApplyTransforms' engine (antspyx's ``ants.apply_transforms``, linear) through composite.h5: equal to
    SimpleITK's resampling (both are ITK's resampler) inside the image."""
    ants = pytest.importorskip("ants")
    r = registered
    out = r["root"] / "out"
    fixed = ants.image_read(str(r["root"] / "fixed.nii.gz"))
    moving = ants.image_read(str(r["root"] / "moving.nii.gz"))
    warped = ants.apply_transforms(fixed, moving, [str(out / "composite.h5")], interpolator="linear").numpy()
    theirs = sitk_resample(r["moving"], r["m_aff"], r["f_shape"], r["f_aff"], out / "composite.h5")
    mask = inside(_sample_points(r), r["m_shape"], r["m_aff"])
    assert np.abs(warped - theirs)[mask].max() < 1e-4
    crd = np.asarray(nib.load(str(out / "warped.nii.gz")).dataobj, np.float32)
    away = _away_from_borders(r)
    print(f"ANTs through composite.h5 vs warped.nii.gz: max |diff| {np.abs(warped - crd)[away].max():.4g}")


@pytest.mark.slow
def test_without_simpleitk_itk_outputs_and_files_are_one_line_naming_the_extra(tmp_path, shift_model):
    """SimpleITK hidden from a fresh process: --disp-format itk is refused before anything is computed or
    written, an .nrrd input and an .h5 transform too; exit 2, one line naming the extra."""
    from crd_jax.interop.itk import lps_geometry  # noqa: F401  (the module imports without SimpleITK)

    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "f.nii.gz"))
    (tmp_path / "t.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    (tmp_path / "m.nrrd").write_bytes(b"NRRD0004\n")
    hide = "import sys; sys.modules['SimpleITK'] = None; from crd_jax.cli.main import main; sys.exit(main(sys.argv[1:]))"
    cases = [
        (
            [
                "register",
                "--model",
                str(shift_model),
                "--fixed",
                "f.nii.gz",
                "--moving",
                "f.nii.gz",
                "--out-dir",
                "o",
                "--disp-format",
                "itk",
            ],
            "--disp-format itk",
        ),
        (["apply", "--transform", "t.h5", "--reference", "f.nii.gz", "--image", "f.nii.gz", "--out", "w.nii.gz"], "t.h5"),
        (["apply", "--transform", "t.h5", "--reference", "f.nii.gz", "--image", "m.nrrd", "--out", "w.nii.gz"], "m.nrrd"),
    ]
    for argv, source in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = subprocess.run(
            [sys.executable, "-c", hide, *argv], capture_output=True, text=True, cwd=tmp_path, env=ENV, timeout=300
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert source in lines[0] and "crd-jax[itk]" in lines[0] and "Traceback" not in proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before


def recipe(name: str) -> str:
    """The Python block after ``<!-- recipe: NAME -->`` in docs/interop.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "interop.md").read_text()
    block = text.split(f"<!-- recipe: {name} -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize("name", ["simpleitk", "antspyx"])
def test_the_docs_recipes_run_and_reproduce_the_registration(registered, name):
    """docs/interop.md's recipes, run as written in the registration's folder (a fresh interpreter): the same
    image as SimpleITK's resampling here (1e-4), within the interpolation bound of warped.nii.gz."""
    if name == "antspyx":
        pytest.importorskip("ants")
    r = registered
    proc = subprocess.run(
        [sys.executable, "-c", recipe(name)], capture_output=True, text=True, cwd=r["root"], env=ENV, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = r["root"] / ("warped_sitk.nii.gz" if name == "simpleitk" else "warped_ants.nii.gz")
    theirs = np.asarray(nib.load(str(out)).dataobj, np.float32)
    want = sitk_resample(r["moving"], r["m_aff"], r["f_shape"], r["f_aff"], r["root"] / "out" / "composite.h5")
    mask = inside(_sample_points(r), r["m_shape"], r["m_aff"])
    assert np.abs(theirs - want)[mask].max() < 1e-4
    warped = np.asarray(nib.load(str(r["root"] / "out" / "warped.nii.gz")).dataobj, np.float32)
    assert np.abs(theirs - warped)[_away_from_borders(r)].max() < 0.066

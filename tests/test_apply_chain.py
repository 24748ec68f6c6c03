"""``crd-jax apply`` with chains of transforms, points files and other image formats (issue 28, item 3), each
checked against the same map computed by hand with numpy/scipy."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from crd_jax.cli.main import main

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def oblique(spacing, angles, shape, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", angles, degrees=True).as_matrix() @ np.diag(spacing)
    out[:3, 3] = np.asarray(centre) - out[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return out


def grid(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)


def to_world(vox, affine):
    return vox @ affine[:3, :3].T + affine[:3, 3]


def to_voxel(world, affine):
    inv = np.linalg.inv(affine)
    return world @ inv[:3, :3].T + inv[:3, 3]


def by_hand_field(points, field, affine):
    """``p -> A (v + u(v))``, ``v = A^-1 p``, ``u`` linear with edge values (a crd-jax voxel field)."""
    v = to_voxel(np.reshape(points, (-1, 3)), affine)
    u = np.stack([ndimage.map_coordinates(field[..., c], v.T, order=1, mode="nearest") for c in range(3)], -1)
    return to_world(v + u, affine).reshape(np.shape(points))


def smooth_field(shape, scale, seed):
    g = grid(shape)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return np.stack([scale * np.sin(g[..., (c + 1) % 3] / 5 + phase[c]) for c in range(3)], -1).astype(np.float32)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Three grids (moving M, an intermediate F, the reference R), a field M<-F on F's grid, an affine, and a
    field F<-R on R's grid; the moving image smooth."""
    root = tmp_path_factory.mktemp("chain")
    m_shape, f_shape, r_shape = (30, 28, 26), (26, 30, 24), (28, 24, 30)
    m_aff = oblique((1.2, 0.9, 1.4), (10, -20, 15), m_shape)
    f_aff = oblique((1.0, 1.3, 1.1), (-5, 12, 25), f_shape, (1.0, -1.0, 0.5))
    r_aff = oblique((1.4, 1.1, 0.9), (18, 6, -12), r_shape, (-0.5, 0.5, 1.0))
    w = m_aff[:3, :3] @ grid(m_shape)[..., None]
    moving = (np.sin(w[..., 0, 0] / 6) + np.cos(w[..., 1, 0] / 7) * np.sin(w[..., 2, 0] / 8) + 2).astype(np.float32)
    u1 = smooth_field(f_shape, 1.5, 1)  # voxels of F: M's point for each F voxel
    u2 = smooth_field(r_shape, 1.2, 2)  # voxels of R: F's point for each R voxel
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", (3, -2, 4), degrees=True).as_matrix() * 1.02
    affine[:3, 3] = (1.0, -0.5, 0.8)
    nib.save(nib.Nifti1Image(moving, m_aff), str(root / "moving.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(r_shape, np.float32), r_aff), str(root / "reference.nii.gz"))
    nib.save(nib.Nifti1Image(u1, f_aff), str(root / "u1.nii.gz"))
    nib.save(nib.Nifti1Image(u2, r_aff), str(root / "u2.nii.gz"))
    (root / "affine.txt").write_text(
        "# fixed world (RAS, mm) -> moving world, 4x4\n" + "\n".join(" ".join(f"{v:.12g}" for v in row) for row in affine) + "\n"
    )
    return {
        "root": root,
        "moving": moving,
        "m_aff": m_aff,
        "f_aff": f_aff,
        "r_aff": r_aff,
        "r_shape": r_shape,
        "u1": u1,
        "u2": u2,
        "affine": affine,
    }


def compose_by_hand(c, points):
    """ANTs order [u1, affine, u2]: u2 first, then the affine, then u1."""
    q = by_hand_field(points, c["u2"], c["r_aff"])
    q = to_world(q, c["affine"])
    return by_hand_field(q, c["u1"], c["f_aff"])


def test_a_chain_in_ants_order_equals_composing_by_hand(chain, tmp_path):
    c = chain
    root = c["root"]
    argv = [
        "apply",
        "--reference",
        str(root / "reference.nii.gz"),
        "--image",
        str(root / "moving.nii.gz"),
        "--transform",
        str(root / "u1.nii.gz"),
        "--transform",
        str(root / "affine.txt"),
        str(root / "u2.nii.gz"),
    ]
    assert main([*argv, "--out", str(tmp_path / "w.nii.gz")]) == 0
    ours = np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj)
    q = compose_by_hand(c, to_world(grid(c["r_shape"]), c["r_aff"]))
    want = ndimage.map_coordinates(c["moving"], np.moveaxis(to_voxel(q, c["m_aff"]), -1, 0), order=1, mode="nearest")
    assert np.abs(ours - want).max() < 1e-4
    # the order matters: listed the other way round, the result differs
    assert (
        main(
            [
                "apply",
                "--reference",
                str(root / "reference.nii.gz"),
                "--image",
                str(root / "moving.nii.gz"),
                "--transform",
                str(root / "u2.nii.gz"),
                "--transform",
                str(root / "affine.txt"),
                str(root / "u1.nii.gz"),
                "--out",
                str(tmp_path / "w2.nii.gz"),
            ]
        )
        == 0
    )
    assert np.abs(np.asarray(nib.load(str(tmp_path / "w2.nii.gz")).dataobj) - ours).max() > 0.1


def test_itk_affines_and_crd_affine_txt_are_the_same_map(chain, tmp_path):
    """crd-jax's affine.txt (RAS) and the same affine as an ITK .tfm and .mat (LPS, through SimpleITK)."""
    sitk = pytest.importorskip("SimpleITK")
    c = chain
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ c["affine"] @ flip
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(lps[:3, :3].ravel()))
    t.SetTranslation(tuple(lps[:3, 3]))
    t.SetCenter((3.0, -2.0, 5.0))  # a centre, as ANTs writes; the translation compensates
    t.SetTranslation(tuple(lps[:3, 3] + lps[:3, :3] @ np.array([3.0, -2.0, 5.0]) - np.array([3.0, -2.0, 5.0])))
    sitk.WriteTransform(t, str(tmp_path / "a.tfm"))
    sitk.WriteTransform(t, str(tmp_path / "a.mat"))
    pts = tmp_path / "p.csv"
    pts.write_text("x,y,z\n1,2,3\n-10,5,7.5\n")
    outs = []
    for name in ("affine.txt", "a.tfm", "a.mat"):
        path = c["root"] / name if name == "affine.txt" else tmp_path / name
        assert main(["apply", "--transform", str(path), "--points", str(pts), "--out", str(tmp_path / f"{name}.csv")]) == 0
        outs.append(np.loadtxt(tmp_path / f"{name}.csv", delimiter=",", skiprows=1))
    want = to_world(np.array([[1, 2, 3], [-10, 5, 7.5]], float), c["affine"])
    for got in outs:
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_points_map_from_the_reference_to_the_moving_image_and_read_back(chain, tmp_path):
    """Points of the reference go where the chain sends them (by hand); with --lps x and y are negated in and
    out; extra columns (ANTs' t,label,comment) come back unchanged; the output is read as input."""
    c = chain
    root = c["root"]
    chain_args = [
        "--transform",
        str(root / "u1.nii.gz"),
        "--transform",
        str(root / "affine.txt"),
        "--transform",
        str(root / "u2.nii.gz"),
    ]
    ras = np.array([[0.5, 1.0, -2.0], [6.0, -4.0, 3.5], [-8.0, 2.0, 9.0], [40.0, 40.0, 40.0]])  # the last: outside
    pts = tmp_path / "ras.csv"
    pts.write_text("x,y,z,t,label,comment\n" + "".join(f"{x},{y},{z},0,{i},p{i}\n" for i, (x, y, z) in enumerate(ras)))
    assert main(["apply", *chain_args, "--points", str(pts), "--out", str(tmp_path / "out.csv")]) == 0
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "x,y,z,t,label,comment" and [line.split(",")[3:] for line in lines[1:]] == [
        ["0", str(i), f"p{i}"] for i in range(4)
    ]
    got = np.array([[float(v) for v in line.split(",")[:3]] for line in lines[1:]])
    np.testing.assert_allclose(got, compose_by_hand(c, ras), atol=1e-5)

    lps = tmp_path / "lps.csv"
    lps.write_text("x,y,z\n" + "".join(f"{-x},{-y},{z}\n" for x, y, z in ras))
    assert main(["apply", *chain_args, "--points", str(lps), "--lps", "--out", str(tmp_path / "out_lps.csv")]) == 0
    got_lps = np.loadtxt(tmp_path / "out_lps.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(got_lps * [-1, -1, 1], got, atol=1e-5)

    # its own output is an input: mapping it again is the chain applied twice
    assert main(["apply", *chain_args, "--points", str(tmp_path / "out.csv"), "--out", str(tmp_path / "twice.csv")]) == 0
    twice = np.loadtxt(tmp_path / "twice.csv", delimiter=",", skiprows=1, usecols=(0, 1, 2))
    np.testing.assert_allclose(twice, compose_by_hand(c, compose_by_hand(c, ras)), atol=1e-4)


def test_one_crd_field_maps_points_as_the_field_says(tmp_path):
    """A registration's own disp.nii.gz: a reference point p = A i goes to A (i + u(i)) (pull-back: the moving
    image's point), exactly at voxel centres."""
    shape = (20, 22, 18)
    aff = oblique((1.1, 0.8, 1.3), (7, -9, 14), shape)
    u = smooth_field(shape, 2.0, 3)
    nib.save(nib.Nifti1Image(u, aff), str(tmp_path / "disp.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), aff), str(tmp_path / "f.nii.gz"))
    idx = np.array([[3, 4, 5], [10, 11, 9], [17, 2, 15]])
    (tmp_path / "p.csv").write_text("x,y,z\n" + "".join(",".join(f"{v:.10f}" for v in p) + "\n" for p in to_world(idx, aff)))
    for extra in ([], ["--reference", str(tmp_path / "f.nii.gz")]):
        assert (
            main(
                [
                    "apply",
                    "--transform",
                    str(tmp_path / "disp.nii.gz"),
                    *extra,
                    "--points",
                    str(tmp_path / "p.csv"),
                    "--out",
                    str(tmp_path / "o.csv"),
                    "--overwrite",
                ]
            )
            == 0
        )
        got = np.loadtxt(tmp_path / "o.csv", delimiter=",", skiprows=1)
        np.testing.assert_allclose(got, to_world(idx + u[tuple(idx.T)], aff), atol=1e-5)


def test_compact_field_in_a_chain(chain, tmp_path):
    """crd-jax's compact .npz (registration/compact.py) expands to its field, placed by its fixed affine."""
    compact = pytest.importorskip("crd_jax.registration.compact")
    c = chain
    f_shape = c["u1"].shape[:3]
    field = compact.NetworkField(c["u1"], tuple((0, s, 0, 0) for s in f_shape), f_shape, f_shape)
    compact.save(tmp_path / "disp_compact.npz", field, c["f_aff"])
    root = c["root"]
    outs = []
    for first in (str(root / "u1.nii.gz"), str(tmp_path / "disp_compact.npz")):
        out = tmp_path / f"w{len(outs)}.nii.gz"
        assert (
            main(
                [
                    "apply",
                    "--reference",
                    str(root / "reference.nii.gz"),
                    "--image",
                    str(root / "moving.nii.gz"),
                    "--transform",
                    first,
                    "--transform",
                    str(root / "affine.txt"),
                    "--transform",
                    str(root / "u2.nii.gz"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        outs.append(np.asarray(nib.load(str(out)).dataobj))
    assert np.abs(outs[0] - outs[1]).max() < 1e-5


def _nrrd_ras(path, data: np.ndarray, affine: np.ndarray):
    """A NRRD written by hand in RAS space (what 3D Slicer writes): sizes fastest axis first, each axis' space
    direction a column of the NIfTI affine, raw little-endian float32."""
    cols = [affine[:3, k] for k in range(3)]
    head = (
        "NRRD0004\ntype: float\ndimension: 3\nspace: right-anterior-superior\n"
        f"sizes: {' '.join(str(s) for s in data.shape)}\n"
        "space directions: " + " ".join("(" + ",".join(f"{v:.12g}" for v in col) + ")" for col in cols) + "\n"
        "kinds: domain domain domain\nendian: little\nencoding: raw\n"
        "space origin: (" + ",".join(f"{v:.12g}" for v in affine[:3, 3]) + ")\n\n"
    )
    path.write_bytes(head.encode() + np.asarray(data, "<f4").tobytes(order="F"))


def test_the_same_image_as_nifti_mgz_nrrd_and_mha_applies_to_the_same_result(chain, tmp_path):
    """The moving image and the reference in four formats (MGZ through nibabel; NRRD written by hand in RAS
    space and MetaImage, through SimpleITK): the same warped image, and the output on the reference's grid."""
    pytest.importorskip("SimpleITK")
    import SimpleITK as sitk

    c = chain
    root = c["root"]
    ref = nib.load(str(root / "reference.nii.gz"))
    files = {}
    for fmt in ("nii.gz", "mgz", "nrrd", "mha"):
        for name, data, aff in (("m", c["moving"], c["m_aff"]), ("r", np.asarray(ref.dataobj), c["r_aff"])):
            path = tmp_path / f"{name}.{fmt}"
            if fmt == "nii.gz":
                nib.save(nib.Nifti1Image(data, aff), str(path))
            elif fmt == "mgz":
                nib.save(nib.MGHImage(np.asarray(data, np.float32), aff), str(path))
            elif fmt == "nrrd":
                _nrrd_ras(path, data, aff)
            else:  # MetaImage, from the NRRD through SimpleITK (its LPS geometry)
                sitk.WriteImage(sitk.ReadImage(str(tmp_path / f"{name}.nrrd")), str(path))
            files[(name, fmt)] = path
    outs = {}
    for fmt in ("nii.gz", "mgz", "nrrd", "mha"):
        out = tmp_path / f"w_{fmt.replace('.', '_')}.nii.gz"
        assert (
            main(
                [
                    "apply",
                    "--reference",
                    str(files[("r", fmt)]),
                    "--image",
                    str(files[("m", fmt)]),
                    "--transform",
                    str(root / "affine.txt"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        img = nib.load(str(out))
        np.testing.assert_allclose(img.affine, c["r_aff"], atol=1e-4)
        outs[fmt] = np.asarray(img.dataobj)
    for fmt in ("mgz", "nrrd", "mha"):
        assert np.abs(outs[fmt] - outs["nii.gz"]).max() < 1e-4, fmt


def test_labels_default_to_nearest(chain, tmp_path):
    c = chain
    labels = (c["moving"] * 3).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, c["m_aff"]), str(tmp_path / "seg.nii.gz"))
    base = [
        "apply",
        "--reference",
        str(c["root"] / "reference.nii.gz"),
        "--image",
        str(tmp_path / "seg.nii.gz"),
        "--labels",
        "--transform",
        str(c["root"] / "affine.txt"),
    ]
    assert main([*base, "--out", str(tmp_path / "a.nii.gz")]) == 0
    assert main([*base, "--interpolation", "nearest", "--out", str(tmp_path / "b.nii.gz")]) == 0
    a, b = (np.asarray(nib.load(str(tmp_path / n)).dataobj) for n in ("a.nii.gz", "b.nii.gz"))
    assert a.dtype == np.int16 and np.array_equal(a, b) and set(np.unique(a)) <= set(np.unique(labels))


@pytest.mark.slow
def test_registering_nrrd_and_mgz_inputs_equals_nifti(tmp_path, shift_model):
    """register reads the same pair as NIfTI, MGZ and NRRD to the same warped image (a fresh process each)."""
    shape = (34, 30, 28)
    aff = oblique((1.2, 1.0, 1.4), (8, -6, 12), shape)
    g = to_world(grid(shape), aff)
    f = (np.sin(g[..., 0] / 7) + np.cos(g[..., 1] / 8) + 2).astype(np.float32)
    m = (np.sin((g[..., 0] + 1.5) / 7) + np.cos((g[..., 1] - 1) / 8) + 2).astype(np.float32)
    results = {}
    for fmt in ("nii.gz", "mgz", "nrrd"):
        for name, data in (("f", f), ("m", m)):
            path = tmp_path / f"{name}.{fmt}"
            if fmt == "nii.gz":
                nib.save(nib.Nifti1Image(data, aff), str(path))
            elif fmt == "mgz":
                nib.save(nib.MGHImage(data, aff), str(path))
            else:
                pytest.importorskip("SimpleITK")
                _nrrd_ras(path, data, aff)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "crd_jax",
                "register",
                "--model",
                str(shift_model),
                "--fixed",
                f"f.{fmt}",
                "--moving",
                f"m.{fmt}",
                "--no-affine",
                "--out-dir",
                f"out_{fmt}",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=ENV,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        img = nib.load(str(tmp_path / f"out_{fmt}" / "warped.nii.gz"))
        np.testing.assert_allclose(img.affine, aff, atol=1e-4)
        results[fmt] = np.asarray(img.dataobj)
    for fmt in ("mgz", "nrrd"):
        assert np.abs(results[fmt] - results["nii.gz"]).max() < 1e-4, fmt


@pytest.mark.parametrize(
    "text, needle",
    [
        ("1 0 0 0\n0 nan 0 0\n0 0 1 0\n0 0 0 1\n", "NaN/Inf"),  # said a wrong shape, (4, 4)
        ("1 0 0\n0 1 0\n0 0 1\n", "got shape (3, 3)"),
        ("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 1 1\n", "last row"),
        ("0 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", "singular"),
    ],
)
def test_an_affine_txt_is_refused_for_what_is_wrong_with_it(tmp_path, text, needle):
    from crd_jax.errors import InputError
    from crd_jax.interop.chain import read_ras_matrix

    (tmp_path / "affine.txt").write_text(text)
    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        read_ras_matrix(tmp_path / "affine.txt")

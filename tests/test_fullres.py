"""The full-resolution end of ``crd-jax register``: slab-wise warps and Jacobians, the field mapped back and
reoriented on the device, normalisation applied after downsampling, and streamed NIfTI writes; each against
the plain implementation it replaces."""

import gzip

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from crd_jax import metrics
from crd_jax.data.io import Volume, gzip_members, save_nifti
from crd_jax.data.preprocess import normalize, padded_shape, place, resample
from crd_jax.ops.spatial import resize_field, warp
from crd_jax.registration import pipeline, space, warping


@pytest.fixture
def tiny_slabs(monkeypatch):
    monkeypatch.setattr(warping, "SLAB_VOXELS", 100)  # many slabs, the last one partial


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(23, 17, 19), (9, 8, 7), (30, 20)])
def test_slab_warps_equal_the_whole_volume_warp(tiny_slabs, shape):
    rng = np.random.default_rng(0)
    img = rng.random(shape).astype(np.float32)
    disp = rng.normal(0, 2, shape + (len(shape),)).astype(np.float32)
    assert warping._slabs(shape) > 1
    whole = np.asarray(warp(jnp.asarray(img)[None, ..., None], jnp.asarray(disp)[None]))[0, ..., 0]
    np.testing.assert_allclose(warping.warp_image(img, disp), whole, atol=1e-6)
    labels = rng.integers(0, 300, shape).astype(np.int16)
    nearest = np.asarray(warp(jnp.asarray(labels, jnp.int32)[None, ..., None], jnp.asarray(disp)[None], order=0))[0, ..., 0]
    out = warping.warp_labels(labels, disp)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, nearest)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(9, 10, 11, 3), (31, 7, 5, 3), (2, 5, 4, 3), (12, 13, 2)])
def test_slab_jacobian_equals_numpy_gradient_version(tiny_slabs, shape):
    disp = np.random.default_rng(1).normal(0, 0.6, shape).astype(np.float32)
    ours, ref = warping.jacobian_determinant(disp), metrics.jacobian_determinant(disp)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert warping.count_folds(disp) == int((ref <= 0).sum()) > 0


@pytest.mark.slow
def test_field_mapped_back_to_the_original_orientation_is_the_same_world_displacement():
    """For every original voxel ``i`` (reoriented voxel ``j``, the same world point), the field brought back to
    the original grid moves ``i`` by the same world vector as the reoriented field moves ``j``: closed form
    through the two affines, for every orientation tried."""
    rng = np.random.default_rng(2)
    shape = (6, 7, 5)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    for codes in ("LPS", "RAS", "SRA", "LIP", "AIL", "PSR"):
        affine = nib.orientations.inv_ornt_aff(nib.orientations.axcodes2ornt(codes), shape) @ np.diag([1.5, 1.0, 2.0, 1.0])
        volume = Volume(rng.random(shape).astype(np.float32), affine)
        reoriented, transform = space.to_model_space(volume, "RAS")
        disp = rng.normal(size=reoriented.data.shape + (3,)).astype(np.float32)
        ours = np.asarray(space.field_to_original(jnp.asarray(disp), transform, shape))
        assert ours.shape == shape + (3,)
        j = np.rint((np.linalg.inv(reoriented.affine) @ affine @ np.c_[grid, np.ones(len(grid))].T)[:3].T).astype(int)
        world_re = disp[j[:, 0], j[:, 1], j[:, 2]] @ reoriented.affine[:3, :3].T
        world_ours = ours[grid[:, 0], grid[:, 1], grid[:, 2]] @ affine[:3, :3].T
        np.testing.assert_allclose(world_ours, world_re, atol=1e-5)


@pytest.mark.parametrize("mode", ["none", "minmax", "percentile"])
def test_prepare_matches_normalising_and_resampling_at_full_resolution_with_scipy(mode):
    """:func:`pipeline.prepare` normalises after downsampling (statistics from the full images); the reference
    normalises first, resamples with scipy (the training data's resampler) and centres on the canvas."""
    rng = np.random.default_rng(3)
    fixed = (rng.random((40, 48, 36)) * 900).astype(np.float32)
    moving = (rng.random((40, 48, 36)) * 700 + 50).astype(np.float32)
    pre = {"normalize": mode, "resample_shape": [20, 24, 18]}
    ours, used = pipeline.prepare(pre, 16, fixed, moving)
    placement = place((20, 24, 18), padded_shape((20, 24, 18), 16))
    assert used == mode and ours.placement == placement and ours.grid == (40, 48, 36) and ours.work == (20, 24, 18)
    # affine maps commute with linear resampling; percentile clipping before or after it differs a little
    tol = 1e-4 * 900 if mode == "none" else (1e-5 if mode == "minmax" else 0.02)
    for image, net in ((fixed, ours.fixed), (moving, ours.moving)):
        ref = placement.apply(resample(normalize(image, mode), (20, 24, 18), 1))
        np.testing.assert_allclose(np.asarray(net)[0, ..., 0], ref, atol=tol)


@pytest.mark.slow
def test_map_back_on_device_equals_restoring_and_resizing():
    rng = np.random.default_rng(4)
    pre = {"resample_shape": [20, 24, 18]}
    prepared, _ = pipeline.prepare(
        pre, 16, rng.random((40, 48, 36)).astype(np.float32), rng.random((40, 48, 36)).astype(np.float32)
    )
    canvas = rng.normal(size=(1,) + prepared.placement.canvas_shape + (3,)).astype(np.float32)
    out = np.asarray(pipeline.map_back(prepared, canvas))
    assert out.shape == (40, 48, 36, 3)
    restored = prepared.placement.restore(canvas[0])
    ref = np.asarray(resize_field(jnp.asarray(restored)[None], (40, 48, 36))[0])
    np.testing.assert_allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize(
    "shape,dtype,order",
    [
        ((50, 60, 70, 3), np.float32, "C"),
        ((33, 20, 11), np.int16, "C"),
        ((40, 30), np.float32, "C"),
        ((37, 66, 9), np.float32, "F"),
    ],
)
def test_streamed_nifti_writes_read_back_exactly_with_nibabel_and_simpleitk(tmp_path, monkeypatch, shape, dtype, order):
    sitk = pytest.importorskip("SimpleITK")

    from crd_jax.data import io

    real = io.nifti_blocks
    monkeypatch.setattr(io, "nifti_blocks", lambda img, data: real(img, data, block=10_000))  # many gzip members
    data = (np.random.default_rng(5).random(shape) * 100).astype(dtype, order=order)  # "F": already the file's order
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    for name in ("x.nii.gz", "x.nii"):
        save_nifti(tmp_path / name, data, affine, intent="vector" if data.ndim == 4 else None)
        back = nib.load(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(back.dataobj), data)
        assert back.get_data_dtype() == dtype and np.allclose(back.affine, affine)
        itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))
        np.testing.assert_array_equal(itk, data.T if data.ndim < 4 else np.moveaxis(data, -1, 0).transpose(0, 3, 2, 1))
    raw = gzip.open(tmp_path / "x.nii.gz").read()
    assert raw == (tmp_path / "x.nii").read_bytes()
    assert len(gzip_members(raw, chunk=1000)) > 1 and gzip.decompress(b"".join(gzip_members(raw, chunk=1000))) == raw


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_gzip_members_from_isal_and_the_zlib_fallback_decompress_to_the_input(monkeypatch, deflate):
    import zlib

    from crd_jax.data import io

    if deflate == "isal":
        isal_zlib = pytest.importorskip("isal.isal_zlib")
        assert io._deflate_module(1) is isal_zlib
    else:
        monkeypatch.setattr(io, "_deflate_module", lambda level: zlib)
    raw = np.cumsum(np.random.default_rng(2).normal(size=200_000)).astype(np.float32).tobytes() + bytes(50_000)
    members = gzip_members(raw, chunk=65_536)
    assert len(members) == -(-len(raw) // 65_536) and all(
        m[:2] == b"\x1f\x8b" for m in members
    )  # gzip magic: ordinary gzip members
    assert gzip.decompress(b"".join(members)) == raw
    assert len(b"".join(members)) < len(raw)  # the zero tail compresses


def test_user_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    from crd_jax.user_cache import cache_folder

    monkeypatch.setenv("CRD_JAX_CACHE_DIR", str(tmp_path / "c"))
    assert cache_folder("xla") == str(tmp_path / "c" / "xla") and (tmp_path / "c" / "xla").is_dir()
    monkeypatch.setenv("CRD_JAX_CACHE_DIR", "off")
    assert cache_folder("xla") is None
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CRD_JAX_CACHE_DIR", str(tmp_path / "file"))  # not a folder: no cache, no error
    assert cache_folder("xla") is None


def test_streamed_nifti_keeps_header_extensions_of_the_source(tmp_path):
    data = np.random.default_rng(6).random((12, 10, 8)).astype(np.float32)
    src = nib.Nifti1Image(data, np.eye(4))
    src.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"written by a scanner pipeline"))
    nib.save(src, tmp_path / "src.nii.gz")
    header = nib.load(tmp_path / "src.nii.gz").header
    for name in ("out.nii.gz", "out.nii"):
        save_nifti(tmp_path / name, data * 2, np.eye(4), header)
        back = nib.load(tmp_path / name)
        np.testing.assert_array_equal(np.asarray(back.dataobj), data * 2)
        assert [e.get_content() for e in back.header.extensions] == [b"written by a scanner pipeline"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "src,dst", [((23, 17, 30), (16, 20, 31)), ((9, 8, 7), (18, 4, 7)), ((31, 29, 33), (15, 14, 16)), ((12, 10), (7, 20))]
)
def test_compiled_resampling_equals_scipy_zoom(src, dst):
    """What ``crd-jax register`` resamples its inputs with equals the training data's resampling
    (``scipy.ndimage.zoom``, order 1, grid mode, edges repeated) up to float32 rounding."""
    image = (np.random.default_rng(5).random(src) * 1000).astype(np.float32)
    np.testing.assert_allclose(space.resample_linear(image, dst), resample(image, dst, 1), rtol=1e-5, atol=1e-3)
    assert space.resample_linear(image, src) is image

"""Data: I/O, layouts, bad input, preprocessing, pairs, loader, synthetic data (small files in tmp dirs)."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from crd_jax import metrics
from crd_jax.data import (
    PairLoader,
    Preprocessor,
    SyntheticConfig,
    SyntheticDataset,
    VolumeDataset,
    eval_pairs,
    label_protocol,
    list_subjects,
    load_image,
    load_labels,
    make_subject,
    padded_shape,
    place,
    save_nifti,
    save_npz,
    select,
    train_pair,
)
from crd_jax.data.preprocess import normalize, resample
from crd_jax.errors import InputError

AFFINE = np.array([[-1.2, 0, 0, 90.0], [0, 1.0, 0.1, -126.0], [0, 0, 1.5, -72.0], [0, 0, 0, 1]])


def _write(path, data, affine=AFFINE, dtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data if dtype is None else data.astype(dtype)), affine)
    nib.save(img, str(path))
    return path


def _volume(shape=(8, 9, 10), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def _labels(shape=(8, 9, 10), seed=0):
    return np.random.default_rng(seed).integers(0, 5, shape).astype(np.uint8)


# --- I/O --------------------------------------------------------------------------------------------


def test_nifti_round_trip_keeps_affine_and_types(tmp_path):
    vol = _volume()
    src = _write(tmp_path / "a.nii.gz", vol)
    loaded = load_image(src)
    np.testing.assert_array_equal(loaded.data, vol)
    np.testing.assert_allclose(loaded.affine, AFFINE)
    out = tmp_path / "out" / "b.nii.gz"
    save_nifti(out, loaded.data * 2, loaded.affine, loaded.header)
    again = load_image(out)
    np.testing.assert_allclose(again.data, vol * 2)
    np.testing.assert_allclose(again.affine, AFFINE)
    assert loaded.spacing == pytest.approx((1.2, 1.0, np.hypot(0.1, 1.5)))
    lab = load_labels(_write(tmp_path / "l.nii.gz", _labels()))
    assert lab.data.dtype == np.int32
    np.testing.assert_array_equal(lab.data, _labels())
    # nothing but the targets in the output folder: writes go through a temporary file and a rename
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.nii.gz"]


def test_npz_vol_seg_convention(tmp_path):
    save_npz(tmp_path / "s.npz", vol=_volume(), seg=_labels().astype(np.float32))
    np.testing.assert_array_equal(load_image(tmp_path / "s.npz").data, _volume())
    np.testing.assert_array_equal(load_labels(tmp_path / "s.npz").data, _labels())


def test_trailing_singleton_axes_are_dropped(tmp_path):
    loaded = load_image(_write(tmp_path / "a.nii.gz", _volume((8, 9, 10, 1))))
    assert loaded.data.shape == (8, 9, 10)
    assert load_image(_write(tmp_path / "b.nii.gz", _volume((8, 9, 1))), ndim=2).data.shape == (8, 9)


@pytest.mark.parametrize(
    "make,problem",
    [
        (lambda p: p, "no such file"),
        (lambda p: (p.mkdir(), p)[1], "is a folder"),
        (lambda p: _write(p, _volume((6, 7, 8, 3))), "(4-D), expected a 3-D"),
        (lambda p: _write(p, _volume((6, 7))), "(2-D), expected a 3-D"),
        (lambda p: _write(p, np.where(_volume() > 0.5, np.nan, _volume())), "NaN/Inf"),
    ],
)
def test_bad_images_give_one_clear_error(tmp_path, make, problem):
    path = make(tmp_path / "bad.nii.gz")
    with pytest.raises(InputError) as err:
        load_image(path)
    message = str(err.value)
    assert message.startswith(str(path)) and problem in message and "\n" not in message


def test_truncated_and_garbage_files(tmp_path):
    good = _write(tmp_path / "good.nii.gz", _volume((20, 20, 20)))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    for path in (truncated, garbage):
        with pytest.raises(InputError, match="unreadable or truncated"):
            load_image(path)
    text = tmp_path / "x.txt"
    text.write_text("x")
    with pytest.raises(InputError, match="unknown format"):
        load_image(text)


@pytest.mark.parametrize("kind", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("order", ["<", ">"])
def test_compressed_nifti_reads_like_nibabel_reads_it(tmp_path, kind, order):
    """.nii.gz inputs are inflated by ISA-L where it is installed: same data (scaling applied), affine, header
    type and byte order as ``nib.load``, NIfTI-1 and -2."""
    from crd_jax.data.io import _load_nifti

    x = np.random.default_rng(3).random((7, 6, 5)).astype(order + "f4")
    img = kind(x, np.diag([2.0, 3.0, 4.0, 1.0]))
    img.header.set_slope_inter(2.0, 1.0)
    path = tmp_path / "a.nii.gz"
    nib.save(img, path)
    got, ref = _load_nifti(path), nib.load(path)
    assert type(got) is type(ref) and got.header.endianness == ref.header.endianness
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(np.asanyarray(got.dataobj), x * 2.0 + 1.0, rtol=1e-6)
    np.testing.assert_array_equal(got.affine, ref.affine)
    np.testing.assert_allclose(load_image(path).data, np.asanyarray(ref.dataobj), rtol=1e-6)  # as float32


def test_labels_must_be_integers(tmp_path):
    ok = load_labels(_write(tmp_path / "ok.nii.gz", _labels().astype(np.float32)))
    assert ok.data.dtype == np.int32
    with pytest.raises(InputError, match="non-integer values"):
        load_labels(_write(tmp_path / "bad.nii.gz", _volume()))


def test_output_path_that_is_a_folder_is_rejected(tmp_path):
    (tmp_path / "out.nii.gz").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        save_nifti(tmp_path / "out.nii.gz", _volume())


# --- layouts and splits ------------------------------------------------------------------------------


def test_neurite_oasis_layout(tmp_path):
    for i in (3, 1, 2):
        d = tmp_path / f"OASIS_OAS1_{i:04d}_MR1"
        _write(d / "aligned_norm.nii.gz", _volume(seed=i))
        if i != 2:
            _write(d / "aligned_seg35.nii.gz", _labels(seed=i))
    (tmp_path / "subjects.txt").write_text("x")
    subjects = list_subjects("neurite_oasis", tmp_path)
    assert [s.id for s in subjects] == ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1", "OASIS_OAS1_0003_MR1"]
    assert subjects[1].labels is None and subjects[0].labels.endswith("aligned_seg35.nii.gz")
    assert [s.id for s in select(subjects, "0:2")] == ["OASIS_OAS1_0001_MR1", "OASIS_OAS1_0002_MR1"]
    assert [s.id for s in select(subjects, "-1:")] == ["OASIS_OAS1_0003_MR1"]


@pytest.mark.parametrize("with_json", [False, True])
def test_learn2reg_oasis_layout(tmp_path, with_json):
    for i in (1, 2):
        _write(tmp_path / "imagesTr" / f"OASIS_{i:04d}_0000.nii.gz", _volume(seed=i))
        _write(tmp_path / "labelsTr" / f"OASIS_{i:04d}_0000.nii.gz", _labels(seed=i))
    if with_json:
        entries = [
            {"image": f"./imagesTr/OASIS_{i:04d}_0000.nii.gz", "label": f"./labelsTr/OASIS_{i:04d}_0000.nii.gz"} for i in (2,)
        ]
        (tmp_path / "OASIS_dataset.json").write_text(json.dumps({"training": entries}))
    subjects = list_subjects("learn2reg_oasis", tmp_path)
    assert [s.id for s in subjects] == (["OASIS_0002"] if with_json else ["OASIS_0001", "OASIS_0002"])
    assert all(s.labels for s in subjects)


def test_folder_layout_matches_by_name(tmp_path):
    for name in ("S12", "S11"):
        _write(tmp_path / "images" / f"{name}.nii.gz", _volume())
    _write(tmp_path / "labels" / "S11.nii.gz", _labels())
    subjects = list_subjects("folder", tmp_path)
    assert [(s.id, s.labels is not None) for s in subjects] == [("S11", True), ("S12", False)]
    assert [s.id for s in select(subjects, "S12,S11")] == ["S12", "S11"]
    with pytest.raises(InputError, match="unknown subject ids"):
        select(subjects, "S13")


def test_missing_and_empty_datasets(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        list_subjects("folder", tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(InputError, match="empty dataset"):
        list_subjects("folder", tmp_path)
    with pytest.raises(InputError, match="empty dataset"):
        list_subjects("neurite_oasis", tmp_path)


def test_label_protocols():
    assert label_protocol("oasis35") == list(range(1, 36))
    lpba = label_protocol("lpba40")
    assert len(lpba) == 56 and lpba[0] == 21 and lpba[-1] == 182
    assert label_protocol([3, 1]) == [3, 1]
    with pytest.raises(InputError):
        label_protocol("nope")


def test_dataset_shape_checks_name_the_file(tmp_path):
    _write(tmp_path / "images" / "a.nii.gz", _volume((8, 8, 8)))
    bad = _write(tmp_path / "images" / "b.nii.gz", _volume((8, 8, 9)))
    _write(tmp_path / "labels" / "a.nii.gz", _labels((8, 8, 7)))
    ds = VolumeDataset(list_subjects("folder", tmp_path), Preprocessor(multiple=8))
    assert ds.shape == (8, 8, 8)
    with pytest.raises(InputError) as err:
        ds.image(1)
    assert str(err.value).startswith(str(bad)) and "differs from the dataset's" in str(err.value)
    with pytest.raises(InputError, match="label map shape"):
        ds.labels(0)


# --- preprocessing -------------------------------------------------------------------------------------


def test_pad_then_restore_is_exact_and_crop_restores_the_window():
    vol = _volume((13, 20, 7))
    target = padded_shape(vol.shape, 8)
    assert target == (16, 24, 8)
    p = place(vol.shape, target)
    canvas = p.apply(vol)
    assert canvas.shape == target and canvas.sum() == pytest.approx(vol.sum())
    np.testing.assert_array_equal(p.restore(canvas), vol)
    field = np.random.default_rng(0).random((*vol.shape, 3))
    np.testing.assert_array_equal(p.restore(p.apply(field)), field)
    crop = place(vol.shape, (8, 16, 8))
    small = crop.apply(vol)
    back = crop.restore(small, fill=-1)
    inside = back != -1
    np.testing.assert_array_equal(back[inside], vol[inside])
    assert inside.sum() == 8 * 16 * 7


def test_normalisation_and_resampling():
    x = np.array([[0.0, 2.0], [4.0, 8.0]], np.float32)
    np.testing.assert_allclose(normalize(x, "minmax"), x / 8)
    y = np.arange(1000, dtype=np.float32)
    clipped = normalize(y, "percentile", 1, 99)
    assert clipped.min() == 0 and clipped.max() == 1 and (clipped == 1).sum() > 5
    assert normalize(np.full((3, 3), 5.0), "minmax").max() == 0
    lab = np.zeros((8, 8), np.int32)
    lab[:4] = 3
    np.testing.assert_array_equal(resample(lab, (4, 4), order=0), np.repeat([[3], [3], [0], [0]], 4, axis=1))
    pre = Preprocessor(normalize="minmax", resample_shape=(4, 4), multiple=4)
    assert pre.image(x.repeat(4, 0).repeat(4, 1)).shape == (4, 4)


def test_minmax_of_values_spanning_the_float32_range_is_finite_and_exact():
    """max - min beyond float32 (an image reaching +-3e38): the map to [0, 1] ran into inf - inf (a RuntimeWarning,
    then NaN voxels); against float64 arithmetic."""
    import warnings

    big = np.finfo(np.float32).max
    x = np.array([-big, -1e38, 0.0, 2e38, big], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize(x, "minmax")
    expected = (x.astype(np.float64) + float(big)) / (2.0 * float(big))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


# --- pairs and loading ---------------------------------------------------------------------------------


def test_training_pairs_are_deterministic_and_never_self():
    pairs = [train_pair(7, step, slot, 5) for step in range(200) for slot in range(2)]
    assert pairs == [train_pair(7, step, slot, 5) for step in range(200) for slot in range(2)]
    assert all(m != f for m, f in pairs)
    assert len(set(pairs)) == 20  # every ordered pair of 5 subjects shows up
    assert pairs != [train_pair(8, step, slot, 5) for step in range(200) for slot in range(2)]
    atlas = [train_pair(0, s, 0, 5, atlas=2) for s in range(50)]
    assert all(f == 2 and m != 2 for m, f in atlas)


def test_evaluation_pairs():
    assert len(eval_pairs(6, "all")) == 30
    assert eval_pairs(4, "consecutive") == [(1, 0), (2, 1), (3, 2)]
    assert eval_pairs(3, atlas=0) == [(1, 0), (2, 0)]


def test_loader_batches_and_process_shards():
    ds = SyntheticDataset(SyntheticConfig(shape=(16, 16), num_subjects=6))
    full = PairLoader(ds, 4, seed=3)
    b = full.batch(5)
    assert b["moving"].shape == (4, 16, 16, 1) and b["fixed"].dtype == np.float32
    shards = [PairLoader(ds, 4, seed=3, process_index=p, process_count=2).batch(5) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([s["moving"] for s in shards]), b["moving"])
    steps = [(step, batch["fixed"]) for step, batch in full.iterate(2, 6)]
    assert [s for s, _ in steps] == [2, 3, 4, 5]
    np.testing.assert_array_equal(steps[-1][1], b["fixed"])
    with pytest.raises(ValueError):
        PairLoader(ds, 3, seed=0, process_count=2)


def test_loader_thread_errors_reach_the_consumer():
    class Broken:
        def __len__(self):
            return 3

        def image(self, i):
            raise InputError("subject.nii.gz", "unreadable")

    with pytest.raises(InputError, match="unreadable"):
        list(PairLoader(Broken(), 1, seed=0).iterate(0, 2))


# --- synthetic data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 40), (24, 24, 24)])
def test_synthetic_subjects_are_deterministic_brain_like_and_need_deformable_registration(shape):
    cfg = SyntheticConfig(shape=shape, num_subjects=4, num_labels=12)
    a_img, a_lab = make_subject(cfg, 1)
    b_img, b_lab = make_subject(SyntheticConfig(shape=shape, num_subjects=9, num_labels=12), 1)
    np.testing.assert_array_equal(a_img, b_img)  # independent of the population size
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_img.shape == shape and a_img.dtype == np.float32 and 0 <= a_img.min() and a_img.max() == pytest.approx(1.0)
    present = np.unique(a_lab)
    assert present[0] == 0 and len(present) >= 9  # background + at least 8 structures
    c_img, c_lab = make_subject(cfg, 2)
    overlap = np.nanmean(metrics.dice(a_lab, c_lab, range(1, 13)))
    assert 0.3 < overlap < 0.85  # related subjects, but misaligned
    other_seed = make_subject(SyntheticConfig(shape=shape, num_subjects=4, num_labels=12, seed=1), 1)[0]
    assert not np.array_equal(other_seed, a_img)


def test_synthetic_dataset_splits_are_disjoint():
    cfg = SyntheticConfig(shape=(16, 16), num_subjects=6)
    train, test = SyntheticDataset(cfg, 0, 4), SyntheticDataset(cfg, 4, 2)
    assert train.ids[-1] == "synth0003" and test.ids == ["synth0004", "synth0005"]
    np.testing.assert_array_equal(test.image(0), make_subject(cfg, 4)[0])


def test_slice_dataset_pairs_the_same_slice_of_two_subjects(tmp_path):
    from crd_jax.data.dataset import SliceDataset

    vols = [_volume((6, 8, 10), seed=i) for i in range(3)]
    for i, v in enumerate(vols):
        _write(tmp_path / "images" / f"S{i}.nii.gz", v)
        _write(tmp_path / "labels" / f"S{i}.nii.gz", _labels((6, 8, 10), seed=i))
    base = VolumeDataset(list_subjects("folder", tmp_path), Preprocessor(normalize="none", multiple=8))
    ds = SliceDataset(base, axis=2, start=3, stop=7)
    assert len(ds) == 12 and ds.group_size == 3 and ds.shape == (8, 8)
    assert ds.ids[:4] == ["S0@3", "S1@3", "S2@3", "S0@4"]
    np.testing.assert_array_equal(ds.placement.restore(ds.image(4)), vols[1][:, :, 4])
    np.testing.assert_array_equal(ds.placement.restore(ds.labels(5), fill=0), _labels((6, 8, 10), seed=2)[:, :, 4])
    for step in range(50):
        m, f = train_pair(0, step, 0, len(ds), group_size=3)
        assert m != f and m // 3 == f // 3
    pairs = eval_pairs(len(ds), "all", group_size=3)
    assert len(pairs) == 4 * 6 and all(m // 3 == f // 3 for m, f in pairs)
    assert ds.volume(0).spacing == pytest.approx((1.2, 1.0))
    with pytest.raises(InputError, match="outside"):
        SliceDataset(base, axis=2, start=5, stop=11)

"""Property-based fuzzing (hypothesis) of what users hand crd-jax: ``model.json``, pairs files (register's and
evaluate's), point files, NIfTI headers and payloads, and training config values. The property is the
contract: every input is either accepted (and then well-formed: finite voxels of the header's shape, plain
output names, values in range) or refused with :class:`crd_jax.errors.InputError` (a one-line message),
never another exception. Bounded for CI: a fixed number of examples per test, derandomized, no deadline;
the whole file runs in about 15 s on two cores."""

import io
import json
import math
import os
import string

import nibabel as nib
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from crd_jax.errors import InputError  # noqa: E402

# CRD_JAX_FUZZ_EXAMPLES=2000 (and CRD_JAX_FUZZ_RANDOM=1 for new seeds) for a longer search than CI's
EXAMPLES = int(os.environ.get("CRD_JAX_FUZZ_EXAMPLES", "80"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("CRD_JAX_FUZZ_RANDOM") != "1",
    suppress_health_check=list(HealthCheck),
    database=None,
)

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

VALID_SPEC = {
    "format_version": 2,
    "kind": "registrar",
    "factor": 2,
    "label": "x",
    "stage": "s",
    "steps": 3,
    "labels": [1, 2],
    "architecture": {"backbone": "voxelmorph"},
    "preprocessing": {
        "normalize": "minmax",
        "percentiles": [0.5, 99.5],
        "resample_shape": [],
        "multiple": 32,
        "ndim": 3,
        "canvas_shape": [32, 32, 32],
        "intensity": {"p1": 0.0, "p99": 1.0},
        "geometry": {"orientation": "RAS", "spacing": [1.0, 1.0, 1.0], "stored_shape": [32, 32, 32]},
    },
}
PATHS = [
    ("format_version",),
    ("kind",),
    ("factor",),
    ("label",),
    ("steps",),
    ("labels",),
    ("architecture",),
    ("preprocessing",),
    ("preprocessing", "normalize"),
    ("preprocessing", "percentiles"),
    ("preprocessing", "resample_shape"),
    ("preprocessing", "multiple"),
    ("preprocessing", "ndim"),
    ("preprocessing", "canvas_shape"),
    ("preprocessing", "intensity"),
    ("preprocessing", "geometry"),
    ("preprocessing", "geometry", "orientation"),
    ("preprocessing", "geometry", "spacing"),
    ("preprocessing", "geometry", "stored_shape"),
    ("unknown_field",),
]


def _mutated(path, value):
    spec = json.loads(json.dumps(VALID_SPEC))
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return spec


@FUZZ
@given(st.sampled_from(PATHS), json_values)
def test_model_json_fields_are_accepted_only_when_well_formed(tmp_path_factory, path, value):
    from crd_jax.model_io import load_spec

    folder = tmp_path_factory.mktemp("m", numbered=True)
    (folder / "model.json").write_text(json.dumps(_mutated(path, value)))
    try:
        spec = load_spec(folder)
    except InputError as exc:
        assert "\n" not in str(exc) and "model.json" in str(exc)
        return
    pre = spec.get("preprocessing", {})
    assert spec["kind"] in ("registrar", "teacher") and isinstance(spec["factor"], int) and spec["factor"] >= 1
    assert set(spec) <= set(VALID_SPEC) | {"shipped", "source"}
    geometry = pre.get("geometry")
    if geometry:
        assert all(8 <= s <= 4096 for s in geometry["stored_shape"])
        assert all(0 < v <= 100 and math.isfinite(v) for v in geometry["spacing"])
        assert sorted(c for c in geometry["orientation"] if c in "LR") and len(set(geometry["orientation"])) == 3
    assert all(8 <= s <= 1024 for s in pre.get("resample_shape") or [])


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_model_json_bytes(tmp_path_factory, raw):
    from crd_jax.model_io import load_spec

    folder = tmp_path_factory.mktemp("m", numbered=True)
    (folder / "model.json").write_bytes(raw)
    try:
        load_spec(folder)
    except InputError as exc:
        assert "\n" not in str(exc)


cells = st.text(alphabet=string.ascii_letters + string.digits + "._-/ ,\"'#\\\n\x00é", max_size=30)


@FUZZ
@given(st.lists(cells, max_size=6))
def test_register_pairs_csv(tmp_path_factory, rows):
    from crd_jax.cli.register import read_register_pairs as read_pairs_csv

    folder = tmp_path_factory.mktemp("p", numbered=True)
    path = folder / "pairs.csv"
    path.write_text("\n".join(rows), encoding="utf-8", errors="surrogateescape")
    try:
        pairs = read_pairs_csv(str(path))
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    names = [p.name for p in pairs]
    assert len(set(names)) == len(names)
    assert all(n and "/" not in n and n not in (".", "..") for n in names)
    assert [p.name for p in folder.iterdir()] == ["pairs.csv"]


@FUZZ
@given(st.binary(max_size=300))
def test_register_pairs_csv_bytes(tmp_path_factory, raw):
    from crd_jax.cli.register import read_register_pairs as read_pairs_csv

    path = tmp_path_factory.mktemp("p", numbered=True) / "pairs.csv"
    path.write_bytes(raw)
    try:
        read_pairs_csv(str(path))
    except InputError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.binary(max_size=200), st.lists(st.text(alphabet="ab01", min_size=1, max_size=3), max_size=4))
def test_evaluate_pairs_file(tmp_path_factory, raw, ids):
    from crd_jax.cli.evaluate import read_pair_ids as _read_pairs

    path = tmp_path_factory.mktemp("e", numbered=True) / "pairs.csv"
    path.write_bytes(raw)
    try:
        pairs = _read_pairs(str(path), ids)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert pairs and all(0 <= m < len(ids) and 0 <= f < len(ids) for m, f in pairs)


@FUZZ
@given(
    st.binary(max_size=200)
    | st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4), max_size=4).map(
        lambda rows: "\n".join(",".join(repr(v) for v in r) for r in rows).encode()
    )
)
def test_points_file(tmp_path_factory, raw):
    from crd_jax.cli.apply import read_points

    path = tmp_path_factory.mktemp("pts", numbered=True) / "pts.csv"
    path.write_bytes(raw)
    try:
        table = read_points(path)
    except InputError as exc:
        assert "\n" not in str(exc)
        return
    assert table.ndim == 2 and table.shape[1] == 3 and len(table) and np.all(np.isfinite(table))


def _header_bytes(dims, pixdim, datatype, vox_offset, qform, sform, srow, slope):
    data = np.random.default_rng(0).random((6, 6, 6)).astype(np.float32)
    img = nib.Nifti1Image(data, np.eye(4))
    raw = bytearray(img.to_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    hdr["dim"][: len(dims)] = dims
    hdr["pixdim"][1:4] = pixdim
    hdr["datatype"] = datatype
    hdr["vox_offset"] = vox_offset
    hdr["qform_code"], hdr["sform_code"] = qform, sform
    hdr["srow_x"] = srow
    hdr["scl_slope"] = slope
    raw[:348] = hdr.binaryblock
    return bytes(raw)


small = st.integers(-3, 40)


@FUZZ
@given(
    dims=st.just([3, 6, 6, 6]) | st.just([4, 6, 6, 6, 1]) | st.lists(small, min_size=1, max_size=8),
    pixdim=st.just([1.0, 1.0, 1.0])
    | st.lists(st.floats(-2, 1e6, width=32) | st.sampled_from([float("nan"), float("inf")]), min_size=3, max_size=3),
    datatype=st.just(16) | st.sampled_from([0, 2, 4, 8, 64, 256, 512, 768, 1024, 1280, 1536, 2048, 77]),
    vox_offset=st.just(352.0) | st.sampled_from([0.0, 348.0, 1e9, -5.0, 356.5]),
    qform=st.integers(0, 4),
    sform=st.integers(0, 4),
    srow=st.lists(st.floats(-1e3, 1e3, width=32) | st.just(float("nan")), min_size=4, max_size=4),
    slope=st.sampled_from([0.0, 1.0, -2.0, float("nan"), float("inf"), 1e38]),
    gz=st.booleans(),
    cut=st.just(None) | st.sampled_from([10, 348, 400, 600]),
)
def test_nifti_headers_and_payloads(tmp_path_factory, dims, pixdim, datatype, vox_offset, qform, sform, srow, slope, gz, cut):
    from crd_jax.data.io import load_image, load_labels

    raw = _header_bytes(dims, pixdim, datatype, vox_offset, qform, sform, srow, slope)
    raw = raw[:cut] if cut else raw
    path = tmp_path_factory.mktemp("n", numbered=True) / ("a.nii.gz" if gz else "a.nii")
    if gz:
        import gzip

        raw = gzip.compress(raw)
    path.write_bytes(raw)
    for load in (load_image, load_labels):
        try:
            vol = load(path, 3, require_orientation=True)
        except InputError as exc:
            assert "\n" not in str(exc)
            continue
        assert vol.data.ndim == 3 and np.all(np.isfinite(vol.data)) and np.all(np.isfinite(vol.affine))
        assert not isinstance(vol.data, np.memmap)


CONFIG_FIELDS = [
    "train.lr",
    "train.b1",
    "train.b2",
    "train.lr_decay_factor",
    "train.grad_clip",
    "train.log_every",
    "train.keep_checkpoints",
    "loss.reg_weight",
    "loss.ncc_window",
    "model.shift",
    "data.percentiles",
    "data.resample_shape",
    "data.synthetic.shape",
    "data.synthetic.train",
    "seed",
]
config_values = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**70), 2**70)
    | st.booleans()
    | st.text(max_size=5)
    | st.tuples(st.integers(-5, 2000), st.integers(-5, 2000))
    | st.tuples(st.integers(-5, 2000), st.integers(-5, 2000), st.integers(-5, 2000))
)


@FUZZ
@given(st.sampled_from(CONFIG_FIELDS), config_values)
def test_config_values(field, value):
    from crd_jax.config import base_config
    from crd_jax.training.config_checks import check_values

    config = base_config()
    parent, _, leaf = field.rpartition(".")
    node = config
    for part in parent.split(".") if parent else []:
        node = node[part]
    try:
        with config.unlocked() if hasattr(config, "unlocked") else _nothing():
            node[leaf] = value
    except (TypeError, ValueError, KeyError, AttributeError):  # ml_collections refuses the type: as train.py's flags do
        return
    try:
        check_values(config)
    except InputError as exc:
        assert f"config.{field}" in str(exc) and "\n" not in str(exc)
        return
    if field == "train.lr":
        assert math.isfinite(float(value)) and value > 0
    if field in ("train.b1", "train.b2"):
        assert 0 <= float(value) < 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

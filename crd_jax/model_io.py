"""Model folders: what a finished stage exports and ``crd-jax register`` loads.

A model folder holds ``model.json`` (architecture, resolution factor, preprocessing, label set: everything
needed to rebuild and run the model) and ``params.msgpack`` (the parameters as plain arrays,
``flax.serialization``). It is assembled under a temporary name and renamed into place, so its presence
means "complete"; format 1 (an Orbax ``params/`` folder, earlier releases) is still read.

A backbone that is not crd-jax's own is recorded with where it comes from (``backbone_source``: an entry
point of an installed package, or a module). Loading a model whose backbone this process does not know loads
an installed package's entry point by itself, but imports a recorded module only if the user allows that
module by name (:func:`allow_backbone_modules`, ``--allow-backbone-module``, or ``CRD_JAX_BACKBONE_MODULES``):
importing a module named in a file runs code, and a model folder may come from anywhere. Folders written
before the field existed load as before (crd-jax's own backbones, or one registered in this process).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Dict, Optional, Tuple, Union

import jax
import numpy as np
from flax import serialization

from crd_jax.errors import InputError
from crd_jax.outputs import raise_if_signalled, share_tree

if TYPE_CHECKING:
    from crd_jax.typing import Params

MODEL_JSON = "model.json"
PARAMS_FILE = "params.msgpack"
FORMAT_VERSION = 2
FORMATS = (1, 2)  # 1: Orbax params/ folder (read only)
#: modules a recorded ``backbone_source`` may name that the user allows to be imported (comma-separated)
ALLOW_ENV = "CRD_JAX_BACKBONE_MODULES"
_allowed_modules: set = set()


def allow_backbone_modules(modules: Collection[str]) -> None:
    """Lets :func:`load_spec` import these modules when a ``model.json`` names one as its backbone's source
    (``crd-jax register --allow-backbone-module MODULE``): for this process, in addition to the environment
    variable ``CRD_JAX_BACKBONE_MODULES``."""
    _allowed_modules.update(m.strip() for m in modules if m.strip())


def allowed_backbone_modules(extra: Collection[str] = ()) -> set:
    """The modules the user allows: ``extra``, those given to :func:`allow_backbone_modules`, and those in
    ``CRD_JAX_BACKBONE_MODULES``."""
    from_env = {m.strip() for m in os.environ.get(ALLOW_ENV, "").split(",") if m.strip()}
    return set(extra) | _allowed_modules | from_env


def _with_backbone_source(spec: Dict[str, Any]) -> Dict[str, Any]:
    """``spec`` with ``backbone_source`` (where a fork's backbone comes from) when this process knows it."""
    from crd_jax.models import backbones

    arch = spec.get("architecture")
    if "backbone_source" in spec or not isinstance(arch, dict):
        return spec
    where = backbones.source(str(arch.get("backbone", backbones.COMMON["backbone"])))
    return {**spec, "backbone_source": where} if where else spec


def _host_tree(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _this_process_only():
    """A checkpointer that neither waits for nor involves other processes (model folders hold host
    arrays that one process writes and any process may read)."""
    me = jax.process_index()
    import orbax.checkpoint as ocp  # only format-1 folders need it (and it is slow to import)

    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def is_model_folder(directory: Path) -> bool:
    """A folder crd-jax wrote as a model: ``model.json`` with our format marker."""
    try:
        return json.loads((Path(directory) / MODEL_JSON).read_text()).get("format_version") in FORMATS
    except (OSError, ValueError, AttributeError):
        return False


OUR_ENTRIES = (MODEL_JSON, PARAMS_FILE, "params")  # what crd-jax writes in a model folder (params/: format 1)


def save_model(directory: Path, params: Params, spec: Dict[str, Any], overwrite: bool = False) -> None:
    """Writes ``params`` (``params.msgpack``, plain arrays) and ``spec`` (``model.json``) as a model folder,
    atomically (built beside, then renamed). An existing folder is replaced only if crd-jax wrote it as a
    model folder and ``overwrite`` is set; anything else there is an error and stays untouched. A model
    folder in which the user keeps other files (notes, results) keeps them: only ``params.msgpack`` and
    ``model.json`` are replaced there, each atomically, the parameters first. A backbone that is not crd-jax's
    own is recorded with where it comes from (``backbone_source``)."""
    directory = Path(directory).absolute()
    spec = _with_backbone_source(dict(spec))
    if _replaceable(directory, overwrite):
        others = sorted(set(os.listdir(directory)) - set(OUR_ENTRIES))
        if others:
            _replace_in_place(directory, params, spec)
            return
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    except OSError as exc:  # a read-only or full file system, no permission
        raise InputError(directory, f"cannot create the model folder ({exc.strerror or exc})") from None
    old = None
    try:
        (tmp / PARAMS_FILE).write_bytes(serialization.msgpack_serialize(_host_tree(params)))
        (tmp / MODEL_JSON).write_text(json.dumps({"format_version": FORMAT_VERSION, **spec}, indent=2))
        share_tree(tmp)
        raise_if_signalled()  # a model lands only if the command line saw no SIGINT/SIGTERM
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, old / "model")
        os.replace(tmp, directory)
    except OSError as exc:  # a full disk: the staging folder goes, an earlier model is put back (below)
        raise InputError(directory, f"cannot write the model folder ({exc.strerror or exc}); nothing was changed") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own staging folder
        if old is not None:
            if not directory.exists():  # the new one did not land: put the old model back
                os.replace(old / "model", directory)
            shutil.rmtree(old, ignore_errors=True)  # the replaced crd-jax model folder (checked above)


def check_model_destination(directory: Union[str, os.PathLike], overwrite: bool) -> Path:
    """What :func:`save_model` will refuse, checked before a command computes anything: ``directory`` must be new,
    or a crd-jax model folder with ``overwrite`` set (nothing else is ever replaced). Returns it as an absolute
    path."""
    from crd_jax.outputs import check_writable_folder

    directory = check_writable_folder(directory, "model folder")
    _replaceable(directory, overwrite)
    return directory


def _replaceable(directory: Path, overwrite: bool) -> bool:
    """Whether a model folder exists at ``directory`` that ``overwrite`` lets us replace (False: nothing there);
    anything else there is an error."""
    if not (directory.exists() or directory.is_symlink()):
        return False
    if not directory.is_dir():
        raise InputError(directory, "exists and is not a folder; nothing was changed")
    if not is_model_folder(directory):
        raise InputError(directory, "exists and is not a crd-jax model folder; nothing was changed (choose a new folder)")
    if not overwrite:
        raise InputError(directory, "a model folder exists there; pass --overwrite to replace it")
    return True


def copy_model(source: Path, directory: Path, overwrite: bool = False) -> None:
    """The model folder crd-jax wrote at ``source`` written again at ``directory``, under :func:`save_model`'s
    rules (atomic; only a crd-jax model folder is replaced, and only with ``overwrite``)."""
    spec = json.loads((Path(source) / MODEL_JSON).read_text())
    spec.pop("format_version", None)
    params = serialization.msgpack_restore((Path(source) / PARAMS_FILE).read_bytes())
    save_model(directory, params, spec, overwrite=overwrite)


def _replace_in_place(directory: Path, params, spec: Dict[str, Any]) -> None:
    """``params.msgpack`` and ``model.json`` of an existing model folder replaced, each written beside and
    renamed over the old one; every other file in the folder is left as it is."""
    from crd_jax.data.io import atomic_path

    raise_if_signalled()
    blobs = [
        (PARAMS_FILE, serialization.msgpack_serialize(_host_tree(params))),
        (MODEL_JSON, json.dumps({"format_version": FORMAT_VERSION, **spec}, indent=2).encode()),
    ]
    for name, blob in blobs:
        with atomic_path(directory / name) as tmp, open(tmp, "wb") as f:
            f.write(blob)


def _check_params(directory: Path, params) -> None:
    leaves = jax.tree_util.tree_leaves(params)
    if not isinstance(params, dict):
        raise InputError(directory, "parameters are not a parameter tree (damaged model folder)")
    arrays = [np.asarray(x) for x in leaves]
    if any(not np.issubdtype(a.dtype, np.floating) for a in arrays):
        raise InputError(directory, "parameters hold non-float arrays (damaged model folder)")
    bad = sum(int((~np.isfinite(a)).sum()) for a in arrays)
    if bad:
        raise InputError(directory, f"parameters hold {bad} NaN/Inf values (damaged model folder)")
    if arrays and all(not a.any() for a in arrays):
        raise InputError(directory, "parameters are all zero (damaged or never trained)")


def _same_structure(params, like) -> bool:
    a = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    b = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(like)}
    return a == b


# --- model.json's schema ------------------------------------------------------------------------------------

KNOWN_FIELDS = (
    "format_version",
    "kind",
    "architecture",
    "factor",
    "label",
    "stage",
    "steps",
    "labels",
    "preprocessing",
    "shipped",
    "card",
    "source",
    "finetuned_from",
    "backbone_source",
)
NORMALIZE_MODES = ("none", "minmax", "percentile")
AXIS_PAIRS = ("LR", "PA", "IS")
MAX_GRID_SIDE = 1024  # voxels per side of a model's grid (resample_shape, canvas_shape)
MAX_STORED_SIDE = 4096
MIN_GRID_SIDE = 8


class _Bad(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}' {problem}")


def _int(value, field, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _Bad(field, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _number(value, field, lo=-float("inf"), hi=float("inf"), open_lo=False):
    import math

    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < lo
        or value > hi
        or (open_lo and value == lo)
    ):
        bounds = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise _Bad(field, f"must be a finite number in {bounds}, got {value!r}")
    return value


def _ints(value, field, lo, hi, lengths):
    if not isinstance(value, list) or len(value) not in lengths:
        raise _Bad(field, f"must be a list of {' or '.join(map(str, lengths))} integers, got {value!r}")
    return [_int(v, f"{field}[{i}]", lo, hi) for i, v in enumerate(value)]


def _orientation(value, field):
    ok = isinstance(value, str) and len(value) == 3 and all(sum(c in pair for c in value) == 1 for pair in AXIS_PAIRS)
    if not ok:
        raise _Bad(field, f"must be 3 axis codes, one of each pair L/R, P/A, I/S (e.g. 'RAS', 'LPS'), got {value!r}")
    return value


def _check_schema(spec) -> None:
    """Raises :class:`_Bad` naming the first field of ``spec`` (a parsed ``model.json``) that is of the wrong
    type, out of range or unknown."""
    if not isinstance(spec, dict):
        raise _Bad("(top level)", f"must be a JSON object, got {type(spec).__name__}")
    unknown = [k for k in spec if k not in KNOWN_FIELDS]
    if unknown:
        raise _Bad(unknown[0], f"is unknown (known fields: {', '.join(KNOWN_FIELDS)})")
    for field in ("kind", "architecture", "factor"):
        if field not in spec:
            raise _Bad(field, "is missing")
    if spec["kind"] not in ("registrar", "teacher"):
        raise _Bad("kind", f"must be 'registrar' or 'teacher', got {spec['kind']!r}")
    if not isinstance(spec["architecture"], dict):
        raise _Bad("architecture", "must be an object")
    factor = _int(spec["factor"], "factor", 1, 16)
    if factor & (factor - 1):
        raise _Bad("factor", f"must be a power of two, got {factor}")
    for field in ("label", "stage", "source"):
        if field in spec and not isinstance(spec[field], str):
            raise _Bad(field, f"must be a string, got {spec[field]!r}")
    if "steps" in spec:
        _int(spec["steps"], "steps", 0, 10**12)
    if "labels" in spec:
        if not isinstance(spec["labels"], list):
            raise _Bad("labels", "must be a list of integers")
        for i, v in enumerate(spec["labels"]):
            _int(v, f"labels[{i}]", -(2**63), 2**63 - 1)
    if "finetuned_from" in spec and not isinstance(spec["finetuned_from"], dict):
        raise _Bad("finetuned_from", "must be an object")
    for field in ("shipped", "card"):
        if field in spec and not isinstance(spec[field], dict):
            raise _Bad(field, "must be an object")
    if "backbone_source" in spec:
        _backbone_source(spec["backbone_source"])
    pre = spec.get("preprocessing", {})
    if not isinstance(pre, dict):
        raise _Bad("preprocessing", "must be an object")
    ndim = _int(pre.get("ndim", 3), "preprocessing.ndim", 2, 3)
    if "normalize" in pre and pre["normalize"] not in NORMALIZE_MODES:
        raise _Bad("preprocessing.normalize", f"must be one of {', '.join(NORMALIZE_MODES)}, got {pre['normalize']!r}")
    if "percentiles" in pre:
        if not isinstance(pre["percentiles"], list) or len(pre["percentiles"]) != 2:
            raise _Bad("preprocessing.percentiles", f"must be [low, high], got {pre['percentiles']!r}")
        lo, hi = (_number(v, f"preprocessing.percentiles[{i}]", 0, 100) for i, v in enumerate(pre["percentiles"]))
        if not lo < hi:
            raise _Bad("preprocessing.percentiles", f"must have low < high, got {pre['percentiles']!r}")
    if pre.get("resample_shape"):
        _ints(pre["resample_shape"], "preprocessing.resample_shape", MIN_GRID_SIDE, MAX_GRID_SIDE, (ndim,))
    elif "resample_shape" in pre and pre["resample_shape"] not in ([], None):
        raise _Bad("preprocessing.resample_shape", f"must be a list of {ndim} integers or [], got {pre['resample_shape']!r}")
    if "canvas_shape" in pre:
        _ints(pre["canvas_shape"], "preprocessing.canvas_shape", 1, MAX_GRID_SIDE, (ndim,))
    if "multiple" in pre:
        multiple = _int(pre["multiple"], "preprocessing.multiple", 1, 1024)
        if multiple & (multiple - 1):
            raise _Bad("preprocessing.multiple", f"must be a power of two, got {multiple}")
    if "intensity" in pre:
        if not isinstance(pre["intensity"], dict):
            raise _Bad("preprocessing.intensity", "must be an object")
        for k, v in pre["intensity"].items():
            _number(v, f"preprocessing.intensity.{k}")
    if "geometry" in pre:
        g = pre["geometry"]
        if not isinstance(g, dict):
            raise _Bad("preprocessing.geometry", "must be an object")
        extra = [k for k in g if k not in ("orientation", "spacing", "stored_shape")]
        if extra:
            raise _Bad(f"preprocessing.geometry.{extra[0]}", "is unknown (known: orientation, spacing, stored_shape)")
        for k in ("orientation", "spacing", "stored_shape"):
            if k not in g:
                raise _Bad(f"preprocessing.geometry.{k}", "is missing")
        _orientation(g["orientation"], "preprocessing.geometry.orientation")
        if not isinstance(g["spacing"], list) or len(g["spacing"]) != 3:
            raise _Bad("preprocessing.geometry.spacing", f"must be 3 voxel sizes in mm, got {g['spacing']!r}")
        for i, v in enumerate(g["spacing"]):
            _number(v, f"preprocessing.geometry.spacing[{i}]", 0.0, 100.0, open_lo=True)
        _ints(g["stored_shape"], "preprocessing.geometry.stored_shape", MIN_GRID_SIDE, MAX_STORED_SIDE, (3,))


def _backbone_source(where) -> None:
    from crd_jax.models.backbones import is_module_name

    if not isinstance(where, dict) or len(where) != 1 or next(iter(where)) not in ("entry_point", "module"):
        raise _Bad("backbone_source", f'must be {{"entry_point": name}} or {{"module": name}}, got {where!r}')
    ((key, value),) = where.items()
    if not isinstance(value, str) or not is_module_name(value) or (key == "entry_point" and "." in value):
        raise _Bad(
            f"backbone_source.{key}", f"must be a {'name' if key == 'entry_point' else 'dotted module name'}, got {value!r}"
        )


def resolve_backbone(spec: Dict[str, Any], path: Union[str, os.PathLike], allowed_modules: Collection[str] = ()) -> None:
    """Makes the backbone of ``spec`` (read from ``path``) buildable in this process: see
    :func:`crd_jax.models.backbones.resolve`. A module recorded in ``backbone_source`` is imported only if
    the user allows it (``allowed_modules``, :func:`allow_backbone_modules` or ``CRD_JAX_BACKBONE_MODULES``);
    otherwise one line names the file, the module and how to allow it."""
    from crd_jax.models import backbones

    name = spec["architecture"].get("backbone", backbones.COMMON["backbone"])
    if not isinstance(name, str):
        raise InputError(path, f"unusable model description: field 'architecture.backbone' must be a string, got {name!r}")
    try:
        backbones.resolve(name, spec.get("backbone_source"), allowed_backbone_modules(allowed_modules))
    except backbones.BackboneUnavailable as exc:
        raise InputError(path, str(exc)) from None


def validate_spec(spec: Any, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """``spec`` checked against model.json's schema (types, ranges, known fields, orientation codes); a
    problem is a one-line :class:`InputError` naming ``path`` and the field."""
    try:
        _check_schema(spec)
    except _Bad as exc:
        raise InputError(path, f"unusable model description: {exc}") from None
    return spec


def load_spec(directory: Path, allowed_modules: Optional[Collection[str]] = None) -> Dict[str, Any]:
    """``model.json`` of a model folder, checked, with its backbone made buildable (:func:`resolve_backbone`;
    ``allowed_modules``: backbone modules the caller allows besides the process-wide ones)."""
    directory = Path(directory)
    path = directory / MODEL_JSON
    if not directory.is_dir():
        raise InputError(directory, "no such model folder")
    try:
        os.stat(path)
    except FileNotFoundError:
        raise InputError(directory, f"not a crd-jax model folder (no {MODEL_JSON})") from None
    except OSError as exc:  # another user's folder: Path.exists() raises PermissionError
        raise InputError(directory, f"cannot be read ({exc.strerror or exc})") from None
    try:
        spec = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise InputError(path, f"unreadable model description ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # JSON errors, bad UTF-8, absurd nesting
        raise InputError(
            path, f"unreadable model description ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    if not isinstance(spec, dict):
        raise InputError(path, "unusable model description: not a JSON object")
    if spec.get("format_version") not in FORMATS or isinstance(spec.get("format_version"), bool):
        raise InputError(path, f"unsupported model format version {spec.get('format_version')!r}")
    validate_spec(spec, path)
    resolve_backbone(spec, path, allowed_modules or ())
    return spec


def load_model(
    directory: Path, like: Optional[Params] = None, allowed_modules: Optional[Collection[str]] = None
) -> Tuple[Params, Dict[str, Any]]:
    """``(params, spec)`` of a model folder. ``like``: a pytree of the expected structure (optional);
    ``allowed_modules``: backbone modules a ``model.json`` may have imported (:func:`load_spec`).

    Format 2 stores ``params.msgpack``; format 1 (earlier releases) an Orbax ``params/`` folder."""
    directory = Path(directory).absolute()
    spec = load_spec(directory, allowed_modules)
    packed = directory / PARAMS_FILE
    if packed.exists():
        if packed.stat().st_size == 0:
            raise InputError(packed, "parameter file is empty (damaged model folder)")
        try:
            params = serialization.msgpack_restore(packed.read_bytes())
        except Exception as exc:  # msgpack raises many types for damaged bytes
            raise InputError(packed, f"parameter file does not decode ({type(exc).__name__}; damaged model folder)") from None
        _check_params(packed, params)
        if like is not None and not _same_structure(params, like):
            raise InputError(packed, "parameters do not match the model's architecture")
        return params, spec
    legacy = directory / "params"
    if not legacy.is_dir():
        raise InputError(directory, f"no {PARAMS_FILE} in the model folder")
    empty = [p for p in legacy.rglob("*") if p.is_file() and p.stat().st_size == 0]
    if empty:  # Orbax would fail asynchronously with tracebacks
        raise InputError(empty[0], "parameter file is empty (damaged model folder)")
    try:
        with _this_process_only() as ckpt:
            if like is None:
                params = ckpt.restore(legacy)
            else:
                import orbax.checkpoint as ocp

                abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
                params = ckpt.restore(legacy, abstract)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(directory, f"parameters do not load ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_params(legacy, params)
    return params, spec

"""Reads PyTorch's legacy (pre-1.6, non-zip) checkpoint format without importing torch.

The file is a sequence of pickles: a magic number, a protocol version, system info, the object itself
(tensors refer to storages through pickle persistent ids ``('storage', type, key, location, numel, ...)``
and are rebuilt by ``torch._utils._rebuild_tensor_v2``), then the sorted list of storage keys, then for each
key the raw storage: an int64 element count followed by the little-endian data.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import struct
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np

from crd_jax.errors import InputError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclasses.dataclass
class _StorageType:
    dtype: Any


@dataclasses.dataclass
class _StorageRef:
    key: str
    dtype: Any
    numel: int


@dataclasses.dataclass
class _TensorRef:
    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a checkpoint")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return _StorageRef(str(key), storage_type.dtype, int(numel))


class _DataUnpickler(pickle.Unpickler):
    """Plain data only (numbers, strings, lists, dicts): the header records of a checkpoint. No class is ever
    looked up, so a hostile file cannot run code through them."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a checkpoint header")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("unexpected persistent id in a checkpoint header")


#: the most elements one tensor may claim (a VM's largest weight has ~60,000; this is ~8 GB of float32)
MAX_TENSOR_ELEMENTS = 2**31


def _checked_geometry(ref: _TensorRef, storages) -> np.ndarray:
    """The storage a tensor reads, after checking that its offset, sizes and strides (all from the file) stay
    inside it: ``as_strided`` trusts them, and a crafted file would otherwise read this process's memory (or
    crash it). Raises ValueError naming the problem."""
    if ref.storage.key not in storages:
        raise ValueError(f"a tensor reads storage {ref.storage.key!r}, which the file does not hold")
    data = storages[ref.storage.key]
    size, stride = ref.size, ref.stride
    if len(size) != len(stride) or not all(isinstance(v, int) for v in (ref.offset, *size, *stride)):
        raise ValueError(f"a tensor's geometry is malformed (size {size}, stride {stride})")
    if ref.offset < 0 or any(v < 0 for v in size) or any(v < 0 for v in stride):
        raise ValueError(f"a tensor has a negative offset, size or stride (offset {ref.offset}, size {size}, stride {stride})")
    if int(np.prod(size, dtype=object)) > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"a tensor claims {int(np.prod(size, dtype=object)):,} elements (at most {MAX_TENSOR_ELEMENTS:,})")
    if 0 not in size:
        last = ref.offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= data.size:
            raise ValueError(f"a tensor reads element {last:,} of a storage of {data.size:,}")
    return data


def _materialize(obj, storages):
    if isinstance(obj, _TensorRef):
        data = _checked_geometry(obj, storages)
        if 0 in obj.size:
            return np.zeros(obj.size, data.dtype)
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[obj.offset :], shape=obj.size, strides=tuple(s * itemsize for s in obj.stride)
        )
        return np.array(view)
    if isinstance(obj, dict):
        return type(obj)((k, _materialize(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, storages) for v in obj)
    return obj


def load_legacy_checkpoint(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """The object stored by ``torch.save`` (legacy format), with tensors as numpy arrays."""
    from crd_jax.data.io import check_input_file

    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such checkpoint file")
    check_input_file(path, "a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"PK":
                raise InputError(
                    path, "zip-format (torch >= 1.6) checkpoint; re-save it with _use_new_zipfile_serialization=False"
                )
            try:
                magic = _DataUnpickler(f).load()
            except Exception:
                magic = None
            if magic != MAGIC_NUMBER:
                raise InputError(path, "not a PyTorch legacy checkpoint (bad magic number)")
            _DataUnpickler(f).load()  # protocol version
            _DataUnpickler(f).load()  # system info
            obj = _Unpickler(f).load()
            keys = _DataUnpickler(f).load()
            storages = {}
            for key in keys:
                (count,) = struct.unpack("<q", f.read(8))
                ref = _find_storage(obj, str(key))
                dtype = np.dtype(ref.dtype if ref is not None else np.float32)
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise InputError(path, "truncated checkpoint (a storage is cut short)")
                storages[str(key)] = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
        return _materialize(obj, storages)
    except InputError:
        raise
    except ValueError as exc:  # _checked_geometry: the problem in words
        raise InputError(path, f"damaged checkpoint: {exc}") from None
    except Exception as exc:
        raise InputError(path, f"unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def _find_storage(obj, key):
    if isinstance(obj, _TensorRef):
        return obj.storage if obj.storage.key == key else None
    if isinstance(obj, dict):
        obj = obj.values()
    if isinstance(obj, (list, tuple, type({}.values()))):
        for v in obj:
            found = _find_storage(v, key)
            if found is not None:
                return found
    return None

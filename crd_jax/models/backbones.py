"""The backbone registry: everything the rest of crd-jax needs to know about a registration network.

Each entry declares its own config fields with their defaults (what ``model.json`` stores besides the
common fields), how to build the Flax module from an architecture dict, how many stride-2 levels it has
(canvas sides must divide by ``2^(levels + k)``), its short name in table labels, and how to build its FST
head (Section III-B) for a resolution factor. Adding a backbone is one :func:`register_backbone` call; see
``docs/extending.md``.

Where a backbone comes from reaches every process: ``model.json`` records it (:func:`source`), and a process
that meets a backbone it does not know (:func:`resolve`) loads it from an installed package's entry point in
the ``crd_jax.backbones`` group, automatically (installing the package was the user's choice), or imports
the module recorded in ``model.json`` only when the user named that module as allowed (importing a module
named by a file runs its code).

A backbone module maps ``(moving, fixed)`` (``(B, *spatial, 1)`` each) to a dict with ``disp``
(``(B, *spatial, ndim)``, voxels) and ``features`` (``{level: (B, *spatial / 2^level, C)}``); optionally
``fields`` (intermediate fields by level, distilled by eq. 11) and ``velocity``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import sys
import types
from typing import Any, Callable, Collection, Dict, Mapping, Optional

import flax.linen as nn

#: fields every architecture has, whatever its backbone
COMMON = {
    "backbone": "voxelmorph",
    "negative_slope": 0.2,
    "diffeomorphic": False,
    "int_steps": 7,
    "cascade": 1,
    "affine": "none",
    "affine_channels": [16, 32, 64, 128, 256],
    "fusion": "paper",
    "teacher_align_corners": False,
    "teacher_output": "half",  # FST phi^T on the student's grid (the paper) or "full" (the authors' code)
}


@dataclasses.dataclass(frozen=True)
class BackboneEntry:
    name: str
    fields: Mapping[str, Any]  # the backbone's own fields and their defaults
    build: Callable[[Mapping[str, Any], Optional[str]], nn.Module]  # (arch, module name) -> module
    levels: Callable[[Mapping[str, Any]], int]
    label: str  # "VM", "Pyd": the prefix of table rows ("VM-L-CRD")
    fst_head: Optional[Callable[[Mapping[str, Any], int], nn.Module]] = None  # (arch, factor) -> head
    #: the importable module whose import registers the entry (filled in by :func:`register_backbone`)
    module: str = ""


REGISTRY: Dict[str, BackboneEntry] = {}
#: the backbones of crd-jax itself (``crd_jax.models.build``): model.json records no source for them
BUILTIN = ("voxelmorph", "pyramid", "affine")
#: the entry-point group through which an installed package provides backbones (name = the backbone's name)
GROUP = "crd_jax.backbones"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class BackboneUnavailable(ValueError):
    """A backbone that this process cannot build, with what the user can do about it (one line)."""


def register_backbone(entry: BackboneEntry, module: Optional[str] = None) -> None:
    """Makes ``entry`` buildable from configs and ``model.json``. ``module``: the module a fresh process must
    import to register it again (default: the module calling this function), recorded in model folders."""
    clash = set(entry.fields) & set(COMMON)
    if clash:
        raise ValueError(f"backbone {entry.name!r} redefines common fields {sorted(clash)}")
    if module is None and not entry.module:
        module = sys._getframe(1).f_globals.get("__name__", "")  # the registering module
    if module:
        entry = dataclasses.replace(entry, module=module)
    REGISTRY[entry.name] = entry


def _installed_entry_point(name: str):
    from importlib.metadata import entry_points

    found = list(entry_points(group=GROUP, name=name))
    return found[0] if found else None


def _load_entry_point(ep) -> None:
    """An entry point's object registered: a :class:`BackboneEntry`, a function returning one, or a module
    (or function) that registers it itself when imported (called)."""
    obj = ep.load()
    if callable(obj) and not isinstance(obj, (BackboneEntry, types.ModuleType)):
        obj = obj()
    if isinstance(obj, BackboneEntry):
        register_backbone(obj, module=obj.module or ep.module)


def resolve(name: str, recorded: Optional[Mapping[str, str]] = None, allowed_modules: Collection[str] = ()) -> None:
    """Makes backbone ``name`` available in this process, or raises :class:`BackboneUnavailable`.

    In order: already registered; an installed package's entry point of that name in :data:`GROUP` (loaded
    without asking: the user chose to install the package); the module ``recorded["module"]`` (``model.json``'s
    ``backbone_source``), imported only if it is in ``allowed_modules``: a module named by a file (one
    downloaded with a model, say) is code, and nothing read from a file runs without the user's word."""
    if name in BUILTIN:
        importlib.import_module("crd_jax.models.build")  # registers crd-jax's own (it imports this module)
    if name in REGISTRY:
        return
    ep = _installed_entry_point(name)
    if ep is not None:
        try:
            _load_entry_point(ep)
        except Exception as exc:  # the package's own failure: one line naming it
            raise BackboneUnavailable(
                f"backbone {name!r}: loading the entry point '{ep.value}' of group {GROUP} failed ({type(exc).__name__}: {exc})"
            ) from None
        if name not in REGISTRY:
            raise BackboneUnavailable(
                f"backbone {name!r}: the entry point '{ep.value}' of group {GROUP} registers no backbone of that name"
            )
        return
    recorded = recorded or {}
    module = recorded.get("module", "")
    if recorded.get("entry_point") or not module:
        how = (
            f"no installed package provides the entry point {recorded['entry_point']!r} of group {GROUP}"
            if recorded.get("entry_point")
            else "crd-jax does not know it and the model records no module that defines it"
        )
        known = ", ".join(sorted(REGISTRY))
        raise BackboneUnavailable(f"unknown backbone {name!r}: {how} (install the package that provides it; registered: {known})")
    if module not in allowed_modules:
        raise BackboneUnavailable(
            f"backbone {name!r} is defined by module '{module}', which crd-jax imports only when "
            f"you allow it (importing runs its code): pass --allow-backbone-module {module} or set "
            f"CRD_JAX_BACKBONE_MODULES={module}"
        )
    try:
        importlib.import_module(module)
    except Exception as exc:  # not on the path, or the module's own failure
        raise BackboneUnavailable(
            f"backbone {name!r}: module '{module}' does not import ({type(exc).__name__}: {exc}; is its folder on PYTHONPATH?)"
        ) from None
    if name not in REGISTRY:
        raise BackboneUnavailable(f"backbone {name!r}: module '{module}' was imported but registers no backbone of that name")


def source(name: str) -> Optional[Dict[str, str]]:
    """What ``model.json`` records as where backbone ``name`` comes from (``backbone_source``): nothing for
    crd-jax's own, ``{"entry_point": name}`` when an installed package provides it in :data:`GROUP`, else
    ``{"module": m}``, the module that registered it (nothing for a script, which cannot be imported)."""
    if name in BUILTIN or name not in REGISTRY:
        return None
    if _installed_entry_point(name) is not None:
        return {"entry_point": name}
    module = REGISTRY[name].module
    if module and module != "__main__" and _MODULE_NAME.match(module) and _importable_as_itself(module):
        return {"module": module}
    return None


def _importable_as_itself(module: str) -> bool:
    """Whether importing ``module`` by name in another process finds the file that registered the backbone: a
    config file loaded by path gets a made-up module name (``_crd_config_x``, ml_collections' ``config_config``)
    that imports nothing, or worse, some other module of that name."""
    import importlib.util
    import os

    loaded = sys.modules.get(module)
    here = getattr(loaded, "__file__", None)
    if here is None:
        return False
    saved = sys.modules.pop(module)  # find_spec looks a module up in sys.modules first
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    finally:
        sys.modules[module] = saved
    origin = getattr(spec, "origin", None)
    return bool(origin) and os.path.realpath(origin) == os.path.realpath(here)


def is_module_name(text: str) -> bool:
    """A dotted Python module name (``pkg.backbones``), the only form ``backbone_source.module`` takes."""
    return bool(_MODULE_NAME.match(text))


def entry(arch: Mapping[str, Any]) -> BackboneEntry:
    """The registry entry of ``arch["backbone"]``; one an installed package provides (entry point) is loaded."""
    name = arch.get("backbone", COMMON["backbone"])
    if name not in REGISTRY and isinstance(name, str) and _installed_entry_point(name) is not None:
        resolve(name)
    if name not in REGISTRY:
        raise ValueError(f"unknown backbone {name!r} (registered: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def architecture(model_cfg: Mapping[str, Any]) -> dict:
    """The common fields and the backbone's own, as plain JSON-able values (defaults filled in)."""
    own = entry(model_cfg).fields
    return {k: _plain(model_cfg[k] if k in model_cfg else default) for k, default in {**COMMON, **own}.items()}


def check_architecture(arch: Mapping[str, Any]) -> None:
    """Rejects fields that neither the backbone nor the common set knows (a ``model.json`` written for another
    version or backbone would otherwise rebuild a different model silently)."""
    known = {**COMMON, **entry(arch).fields}
    for key in arch:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"architecture field '{key}' is unknown to the {arch.get('backbone')!r} backbone{hint}")

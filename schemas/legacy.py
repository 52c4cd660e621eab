"""Config files written before the config was split by concern keep loading: old field names are moved to their
new place, each move announced once per load with a FutureWarning that names the new field.

| old field | new field |
| --- | --- |
| ``calibration.granularity`` (auto, block, sublayer) | ``calibration.walk`` (auto, block, site) |
| ``calibration.sequential: false`` | ``calibration.walk: one_pass`` |
| ``calibration.chunked_attention`` | ``runtime.chunked_attention`` |
| ``calibration.compute_dtype`` | ``runtime.compute_dtype`` |
| ``calibration.dampening_frac`` | ``method: {name: sparsegpt, dampening_frac: ...}`` |
| ``calibration.sparsegpt_block_size`` | ``method: {name: sparsegpt, block_size: ...}`` |
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["migrate_legacy", "REPLACED_IN_SECTION"]

# old names whose new field lives in the same section (old name → new field)
REPLACED_IN_SECTION = {"granularity": "walk", "sequential": "walk"}

_GRANULARITY = {"auto": "auto", "block": "block", "sublayer": "site"}
_TO_RUNTIME = ("chunked_attention", "compute_dtype")
_TO_SPARSEGPT = {"dampening_frac": "dampening_frac", "sparsegpt_block_size": "block_size"}
_OLD_DEFAULTS = {"dampening_frac": 0.01, "sparsegpt_block_size": 128}
# the new fields' defaults: a new field that holds its default gives way to the old name (a copy of a new-style
# section made with model_copy(update={old name: ...}) carries the new field at its default)
_NEW_DEFAULTS = {"walk": "auto", "chunked_attention": True, "compute_dtype": "auto", "dampening_frac": 0.01,
                 "block_size": 128}


def _moved(old: str, new: str) -> None:
    warnings.warn(f"config field '{old}' is now '{new}'; the old name still loads", FutureWarning, stacklevel=6)


def _set_once(section: dict[str, Any], key: str, value: Any, old: str, new: str) -> None:
    if key in section and section[key] != value and section[key] != _NEW_DEFAULTS.get(key, object()):
        raise ValueError(f"config sets both '{old}' ({value!r}) and its new name '{new}' ({section[key]!r}); keep "
                         f"only '{new}'")
    section[key] = value
    _moved(old, new)


def _migrate_walk(cal: dict[str, Any]) -> None:
    sequential = cal.pop("sequential", None)
    granularity = cal.pop("granularity", None)
    if granularity is not None:
        if granularity not in _GRANULARITY:
            raise ValueError(f"calibration.granularity (now calibration.walk) must be one of "
                             f"{', '.join(_GRANULARITY)}; got {granularity!r}")
        if sequential is not False:
            _set_once(cal, "walk", _GRANULARITY[granularity], "calibration.granularity", "calibration.walk")
    if sequential is False:
        _set_once(cal, "walk", "one_pass", "calibration.sequential: false", "calibration.walk: one_pass")
    elif sequential is True:
        _moved("calibration.sequential", "calibration.walk")


def _migrate_method(data: dict[str, Any], cal: dict[str, Any]) -> None:
    method = data.get("method", "magnitude")
    name = method.get("name") if isinstance(method, dict) else getattr(method, "value", method)
    params = dict(method) if isinstance(method, dict) else {"name": name}
    changed = False
    for old, new in _TO_SPARSEGPT.items():
        if old not in cal:
            continue
        value = cal.pop(old)
        if name == "sparsegpt":
            _set_once(params, new, value, f"calibration.{old}", f"method.{new}")
            changed = True
        elif value != _OLD_DEFAULTS[old]:
            warnings.warn(f"config field 'calibration.{old}' applies to method sparsegpt only (now 'method.{new}'); "
                          f"ignored for method {name}", FutureWarning, stacklevel=5)
    if changed:
        data["method"] = params


def migrate_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with every old field moved to its new place (a new dict; the input is not changed). Raises
    ValueError when an old field and its new name are both set to different values."""
    cal = data.get("calibration")
    if not isinstance(cal, dict) or not (set(cal) & {"granularity", "sequential", *_TO_RUNTIME, *_TO_SPARSEGPT}):
        return data
    data, cal = dict(data), dict(cal)
    _migrate_walk(cal)
    runtime = dict(data.get("runtime") or {})
    for key in _TO_RUNTIME:
        if key in cal:
            _set_once(runtime, key, cal.pop(key), f"calibration.{key}", f"runtime.{key}")
    if runtime:
        data["runtime"] = runtime
    _migrate_method(data, cal)
    data["calibration"] = cal
    return data

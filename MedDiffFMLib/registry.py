"""The model registries: models by name, readable without torch (the Slicer panel lists them with this module).

Two registries, each a `Models.json` (Resources/Models.schema.json) beside the `Models/` folder its entries name:
- the bundled one, `Resources/Models.json`, ships with the extension (`models FILE --register NAME --bundled`). A
  bundled model that is not shipped is downloaded into the user cache folder ($MEDDIFFFM_HOME or ~/.cache/meddifffm);
- the user's, `user/Models.json` in that folder, where `models FILE --register NAME` installs a trained model. It
  lives outside the extension because an extension update replaces Resources, and apart from the downloads, so a
  bundled model and the user's never share a file.
A bundled name cannot be registered again by the user; should an update ship a name the user registered already,
the bundled model wins and a warning says so. A damaged user registry is skipped with a warning: the bundled models
stay usable.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import List, Set

from .errors import CheckpointError

log = logging.getLogger(__name__)
_warned: Set[str] = set()  # warnings given once per process (registry() runs at every model lookup)

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
BUNDLED_REGISTRY = RESOURCES / "Models.json"
#: The types Resources/Models.schema.json gives an entry's keys (the schema is not shipped with the extension).
ENTRY_TYPES = {"name": str, "file": str, "url": (str, type(None)), "sha256": str, "size": int, "description": str,
               "preset": str, "licence": str, "training": dict, "test_only": bool, "measured_times": dict}


def cache_dir() -> Path:
    """User folder for downloaded or user-trained models, and the user's registry."""
    return Path(os.environ.get("MEDDIFFFM_HOME") or Path.home() / ".cache" / "meddifffm")


def user_registry() -> Path:
    return cache_dir() / "user" / "Models.json"


def read_registry(path: Path) -> List[dict]:
    """The entries of one registry file; [] when it does not exist."""
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:  # e.g. another user's file, or a folder of that name: as unusable as a damaged one
        raise CheckpointError(f"the model registry {path} cannot be read ({exc.strerror or exc}); "
                              f"{_remedy(path)}") from None
    try:
        models = json.loads(text)["models"]
        for entry in models:
            if not (isinstance(entry.get("name"), str) and isinstance(entry.get("file"), str)):
                raise ValueError(f"an entry without a name or file: {json.dumps(entry)[:80]}")
            wrong = [key for key, kind in ENTRY_TYPES.items() if key in entry and not _is_a(entry[key], kind)]
            if wrong:  # the listing and the lookups would fail on it
                raise ValueError(f"model {entry['name']}: {', '.join(wrong)} of the wrong type (Models.schema.json)")
        return models
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # Type/AttributeError: not objects
        raise CheckpointError(f"the model registry {path} is damaged ({exc}); {_remedy(path)}") from None


def _is_a(value, kind) -> bool:
    return isinstance(value, kind) and not (isinstance(value, bool) and kind is int)  # JSON's true is no integer


def _remedy(path: Path) -> str:
    """What to do about a registry file that cannot be used."""
    if path == BUNDLED_REGISTRY:
        return "restore it from the repository or reinstall the extension"
    return ("repair it, or delete it to forget the models registered there (their files stay in "
            f"{path.parent / 'Models'})")


def registry() -> List[dict]:
    """Every registered model: the bundled ones, then the user's whose names are not bundled. Each entry is a copy
    with "registry": "bundled" or "user" added (the files keep the schema's keys only)."""
    bundled = [dict(entry, registry="bundled") for entry in read_registry(BUNDLED_REGISTRY)]
    names = {entry["name"] for entry in bundled}
    try:
        user = read_registry(user_registry())
    except CheckpointError as exc:
        _warn_once(f"{exc}. Your models are left out until then; the shipped ones are listed")
        user = []
    for entry in user:
        if entry["name"] in names:
            _warn_once(f"the model {entry['name']} registered in {user_registry()} has the name of a model shipped "
                       "with MedDiffFM, which is used instead: register yours again under another name "
                       "(models FILE --register NAME)")
    return bundled + [dict(entry, registry="user") for entry in user if entry["name"] not in names]


def installed_files(entry: dict) -> List[Path]:
    """The files of a registry entry that exist, in the order the tasks look for them: a user entry's in the user
    registry's folder; a bundled one's under Resources, then in the user cache (where its download goes)."""
    relative = entry["file"].replace("\\", "/")  # written on Windows by an earlier version
    folders = [user_registry().parent] if entry.get("registry") == "user" else [RESOURCES, cache_dir()]
    return [folder / relative for folder in folders if (folder / relative).exists()]


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)

"""The model registries: models by name, readable without torch (the Slicer panel lists them with this module).

Two registries, each a `Models.json` (Resources/Models.schema.json) beside the `Models/` folder its entries name:
- the bundled one, `Resources/Models.json`, ships with the extension (`models FILE --register NAME --bundled`);
- the user's, in the user cache folder ($MEDDIFFFM_HOME or ~/.cache/meddifffm), where `models FILE --register NAME`
  installs a trained model. It lives outside the extension because an extension update replaces Resources.
A bundled name cannot be registered again by the user; should an update ship a name the user registered already,
the bundled model wins and a warning says so.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import List

from .errors import CheckpointError

log = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
BUNDLED_REGISTRY = RESOURCES / "Models.json"


def cache_dir() -> Path:
    """User folder for downloaded or user-trained models, and the user's registry."""
    return Path(os.environ.get("MEDDIFFFM_HOME") or Path.home() / ".cache" / "meddifffm")


def user_registry() -> Path:
    return cache_dir() / "Models.json"


def read_registry(path: Path) -> List[dict]:
    """The entries of one registry file; [] when it does not exist."""
    if not path.exists():
        return []
    try:
        models = json.loads(path.read_text(encoding="utf-8"))["models"]
        for entry in models:
            if not (isinstance(entry.get("name"), str) and isinstance(entry.get("file"), str)):
                raise ValueError(f"an entry without a name or file: {json.dumps(entry)[:80]}")
        return models
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # Type/AttributeError: not objects
        remedy = ("restore it from the repository or reinstall the extension" if path == BUNDLED_REGISTRY else
                  "repair it, or delete it to forget the models registered there (their files stay in "
                  f"{path.parent / 'Models'})")
        raise CheckpointError(f"the model registry {path} is damaged ({exc}); {remedy}") from None


def registry() -> List[dict]:
    """Every registered model: the bundled ones, then the user's whose names are not bundled."""
    bundled = read_registry(BUNDLED_REGISTRY)
    names = {entry["name"] for entry in bundled}
    user = read_registry(user_registry())
    for entry in user:
        if entry["name"] in names:
            log.warning("the model %s registered in %s has the name of a model shipped with MedDiffFM, which is used "
                        "instead: register yours again under another name (models FILE --register NAME)",
                        entry["name"], user_registry())
    return bundled + [entry for entry in user if entry["name"] not in names]


def installed_files(entry: dict) -> List[Path]:
    """The files of a registry entry that exist, in the order the tasks look for them: under Resources, then in the
    user cache (where the user's registry keeps its models, and where a bundled model's download goes)."""
    return [folder / entry["file"] for folder in (RESOURCES, cache_dir()) if (folder / entry["file"]).exists()]

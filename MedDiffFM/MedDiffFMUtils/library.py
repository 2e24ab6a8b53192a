"""Where MedDiffFMLib and its Resources live, and which models they offer.

Two layouts hold the same relative structure: the source tree (repo root with `MedDiffFMLib/`,
`Resources/` and the module in `MedDiffFM/`) and the built extension (Slicer's qt-scripted-modules
folder with `MedDiffFMLib/`, `Resources/` and `MedDiffFM.py`). The "library root" is the folder that
contains `MedDiffFMLib/`.
"""
import json
import os
import sys

MODEL_NOT_INSTALLED = "tiny test model not installed"


def libraryRoot():
    """The folder containing the MedDiffFMLib package; makes it importable when run from the source tree."""
    try:
        import MedDiffFMLib
    except ImportError:
        # Loaded from the source tree (Developer mode "additional module path" = .../MedDiffFM):
        # the library sits next to the module folder.
        repoRoot = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if not os.path.isdir(os.path.join(repoRoot, "MedDiffFMLib")):
            raise ImportError(f"MedDiffFMLib was not found (looked in {repoRoot}); reinstall the MedDiffFM extension.")
        sys.path.insert(0, repoRoot)
        import MedDiffFMLib
    return os.path.dirname(os.path.dirname(os.path.abspath(MedDiffFMLib.__file__)))


def modelsFile():
    return os.path.join(libraryRoot(), "Resources", "Models.json")


def availableModels():
    """[(name, description)] from Resources/Models.json; [] when the file is absent or lists nothing."""
    path = modelsFile()
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    entries = data.get("models", data) if isinstance(data, dict) else data
    if isinstance(entries, dict):  # {"name": {...}} form
        entries = [dict(entry, name=name) for name, entry in entries.items()]
    return [(entry["name"], entry.get("description", "")) for entry in entries if "name" in entry]

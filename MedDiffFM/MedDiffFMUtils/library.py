"""Where MedDiffFMLib and its Resources live, and which models they offer.

Two layouts hold the same relative structure: the source tree (repo root with `MedDiffFMLib/`,
`Resources/` and the module in `MedDiffFM/`) and the built extension (Slicer's qt-scripted-modules
folder with `MedDiffFMLib/`, `Resources/` and `MedDiffFM.py`). The "library root" is the folder that
contains `MedDiffFMLib/`.
"""
import json
import os
import sys

MODEL_NOT_INSTALLED = "Resources/Models.json lists none"


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
    """[(name, description, kind)] from Resources/Models.json; [] when the file is absent or lists nothing. kind is
    "base", or the task a ControlNet was fine-tuned for ("lesion", "super-resolution"), as the model's own .json
    says; None when that file cannot be read (the job then says what is wrong)."""
    path = modelsFile()
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    entries = data.get("models", data) if isinstance(data, dict) else data
    if isinstance(entries, dict):  # {"name": {...}} form
        entries = [dict(entry, name=name) for name, entry in entries.items()]
    resources = os.path.dirname(path)
    return [(entry["name"], entry.get("description", ""), _modelKind(resources, entry.get("file")))
            for entry in entries if "name" in entry]


def _modelKind(resources, weightsFile):
    if not weightsFile:
        return None
    try:
        with open(os.path.join(resources, os.path.splitext(weightsFile)[0] + ".json"), encoding="utf-8") as file:
            info = json.load(file)
    except (OSError, ValueError):
        return None
    # As MedDiffFMLib.finetune records it (CONTROLNET_KIND, TASKS); read here without importing torch into Slicer.
    return info.get("task") if info.get("kind") == "controlnet" else "base"

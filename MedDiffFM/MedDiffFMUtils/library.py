"""Where MedDiffFMLib and its Resources live, and which models they offer.

Two layouts hold the same relative structure: the source tree (repo root with `MedDiffFMLib/`,
`Resources/` and the module in `MedDiffFM/`) and the built extension (Slicer's qt-scripted-modules
folder with `MedDiffFMLib/`, `Resources/` and `MedDiffFM.py`). The "library root" is the folder that
contains `MedDiffFMLib/`.
"""
import json
import os
import sys

MODEL_NOT_INSTALLED = "none is registered"


def libraryRoot():
    """The folder containing the MedDiffFMLib package that ships with this module, made importable.

    The copy beside the module wins over any other importable one (a pip or editable install of another checkout):
    jobs must run the library, and read the Models.json, that this module was built with."""
    moduleRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Built extension: the package sits beside MedDiffFM.py; source tree: one folder up from the module's.
    for root in (moduleRoot, os.path.dirname(moduleRoot)):
        if os.path.isdir(os.path.join(root, "MedDiffFMLib")):
            # First on the path even where it already is, further down (Slicer lists its module folders).
            sys.path[:] = [root] + [entry for entry in sys.path if entry != root]
            return root
    try:
        import MedDiffFMLib
    except ImportError:
        raise ImportError(f"MedDiffFMLib was not found next to {moduleRoot} nor installed; reinstall the MedDiffFM "
                          "extension.") from None
    return os.path.dirname(os.path.dirname(os.path.abspath(MedDiffFMLib.__file__)))


def availableModels():
    """[(name, description, kind)] of the registered models (MedDiffFMLib.registry: the bundled Resources/Models.json,
    then the user's); [] when none is listed. kind is "base", or the task a ControlNet was fine-tuned for ("lesion",
    "super-resolution"), as the model's own .json says; None when that file cannot be read (the job then says what is
    wrong). A damaged Resources/Models.json raises MedDiffFMLib.errors.CheckpointError, which names the file and the
    remedy; a damaged user registry is left out with a warning."""
    libraryRoot()
    from MedDiffFMLib import registry  # reads JSON only: no torch in Slicer's process

    return [(entry["name"], entry.get("description", ""), _modelKind(registry.installed_files(entry)))
            for entry in registry.registry()]


def _modelKind(installedFiles):
    if not installedFiles:
        return None
    try:
        with open(os.path.splitext(str(installedFiles[0]))[0] + ".json", encoding="utf-8") as file:
            info = json.load(file)
    except (OSError, ValueError):
        return None
    # As MedDiffFMLib.finetune records it (CONTROLNET_KIND, TASKS); read here without importing torch into Slicer.
    return info.get("task") if info.get("kind") == "controlnet" else "base"

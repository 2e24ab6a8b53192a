"""First-use setup inside Slicer: install the Python packages MedDiffFMLib needs, with consent.

torch comes through the PyTorch Utils extension when it is installed (it picks the wheel that matches
the GPU and driver), otherwise from pip; everything else from Resources/requirements.txt.
"""
import importlib.util
import logging
import os

# Modules the jobs import (psutil: the free-memory check); torch comes first, as the largest download.
REQUIRED_IMPORTS = ("torch", "monai", "einops", "scipy", "SimpleITK", "nibabel", "safetensors", "tqdm", "pydicom",
                    "psutil")


def missingImports():
    return [name for name in REQUIRED_IMPORTS if importlib.util.find_spec(name) is None]


def requirementsFile(libraryRoot):
    return os.path.join(libraryRoot, "Resources", "requirements.txt")


def _installTorch(log):
    import slicer
    try:
        import PyTorchUtils
    except ImportError:
        log("PyTorch Utils extension not found: installing the default torch wheel with pip "
            "(install 'PyTorch' from the Extensions Manager to get a GPU build matched to your driver).")
        slicer.util.pip_install("torch")
        return
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
    if torch is None:
        raise RuntimeError("PyTorch could not be installed; use the PyTorch Utils module to install it, then retry.")


def setupPythonRequirements(libraryRoot, log=logging.info):
    """Install whatever is missing after asking the user; raise RuntimeError if they decline."""
    import slicer
    missing = missingImports()
    if not missing:
        return False
    if not slicer.util.confirmOkCancelDisplay(
            "MedDiffFM needs Python packages that are not installed yet. Installing them needs a network "
            "connection and may take several minutes (PyTorch alone is large). Click OK to install.",
            "MedDiffFM: install Python packages",
            detailedText="Missing: " + ", ".join(missing)):
        raise RuntimeError("MedDiffFM cannot run without its Python packages (installation was declined).")
    if "torch" in missing:
        log("Installing PyTorch (may take several minutes)...")
        _installTorch(log)
    log("Installing MedDiffFM requirements...")
    slicer.util.pip_install(["-r", requirementsFile(libraryRoot)])
    still = missingImports()
    if still:
        raise RuntimeError("These packages are still missing after installation: " + ", ".join(still)
                           + ". Restart Slicer and try again, or install them with slicer.util.pip_install().")
    log("Python packages installed.")
    return True


def computeDeviceMessage():
    """One line saying whether jobs will run on a GPU; CPU works, only slowly. Only counts the GPUs: naming one
    would set up CUDA inside Slicer, holding GPU memory the jobs need for the rest of the session."""
    import torch
    if torch.cuda.is_available():
        return f"CUDA GPU found ({torch.cuda.device_count()}): MedDiffFM jobs will run on it."
    return ("No CUDA GPU found: MedDiffFM will run on the CPU. That works, but a full volume can take "
            "minutes to hours; lower NFE for a quicker preview.")

"""MedDiffFMLogic's work, without Qt: export nodes, run `python -m MedDiffFMLib TASK`, import results.

Every task method takes MRML nodes and returns new MRML nodes; input nodes are only read. With
`wait=False` a method returns the started `TaskRun` instead, whose `poll()` the caller drives (the
module widget does it from a QTimer) and whose `result` holds the new nodes once it has finished.
"""
import atexit
import glob
import logging
import math
import numbers
import os
import shutil
import tempfile

import slicer

from . import library, volumes
from .process import TaskRun, pythonExecutable
from .tasks import ANOMALY_SEGMENTATION_SUFFIX, TASKS

# Colour map of the anomaly map; a procedural table that every Slicer scene has.
ANOMALY_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"


def _slicerApp():
    return getattr(slicer, "app", None)


def _optionalSegment(segmentationNode, segmentId):
    """(node, segment) of an optional segment, or None; a node without its segment, or a segment without its node,
    is a mistake, not 'everywhere'."""
    if segmentationNode is not None and not segmentId:
        raise ValueError(f"A segmentation, {_describe(segmentationNode)}, was given without segmentId: name the "
                         "segment to limit the task to, or leave both out to use the whole image.")
    if segmentId and segmentationNode is None:
        raise ValueError(f"segmentId '{segmentId}' was given without its segmentationNode: pass both to limit the "
                         "task to the segment, or leave both out to use the whole image.")
    return (segmentationNode, segmentId) if segmentId else None


def _checkWholeNumber(name, value, least):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
    return value


def _checkPositiveNumber(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number above 0, got {value!r}")
    return value


def _checkTriple(name, values, check):
    """Three values (x, y, z), each passing check(name, value); a string or a wrong count is refused whole."""
    if isinstance(values, str) or not hasattr(values, "__len__") or len(values) != 3:
        raise ValueError(f"{name} must be three values (x, y, z), got {values!r}")
    return [check(f"each {name} value", value) for value in values]


def _modelArgument(model):
    """A model file as an absolute path, a name as given (a registered model, or one in the user cache): jobs run
    in the library's folder, and no shell expands `~`. A path is what the library reads as one: with a folder
    separator or a model file's suffix."""
    text = str(model)
    if text.startswith("~") or any(sep in text for sep in (os.sep, os.altsep) if sep) \
            or text.endswith((".safetensors", ".json")):
        return os.path.abspath(os.path.expanduser(text))
    return text


def _resultName(inputNode, task):
    return f"{inputNode.GetName()} {TASKS[task].resultSuffix}"


def _checkInputs(task, volumeNode, mask):
    """Console calls get the panel's checks: a clear message instead of an AttributeError later."""
    if TASKS[task].needsInputVolume and volumeNode is None:
        raise ValueError(f"{TASKS[task].title} needs an input volume: pass the CT's volume node.")
    _checkVolume(volumeNode)
    if mask is None:
        return
    segmentationNode, segmentId = mask
    if not (hasattr(segmentationNode, "IsA") and segmentationNode.IsA("vtkMRMLSegmentationNode")):
        what = ("nothing" if segmentationNode is None else _describe(segmentationNode))
        raise ValueError(f"{TASKS[task].title} needs a segmentation node and a segment ID, got {what}. "
                         "Draw the region in the Segment Editor (a labelmap can be converted to a "
                         "segmentation in the Data module).")
    if not segmentId:
        raise ValueError(f"{TASKS[task].title} needs a segment ID (or name): the segment of "
                         f"'{segmentationNode.GetName()}' to work in.")


def _checkVolume(volumeNode):
    """A CT is a scalar volume node; label maps, vector and tensor volumes derive from it, but are never a CT (the
    panel's selector hides them)."""
    if volumeNode is not None and not volumes.isCTVolumeNode(volumeNode):
        raise ValueError(f"{_describe(volumeNode)} is not a CT volume node.")


def _describe(node):
    """'name' (class) of a node, or the repr and type of anything else given in its place (e.g. a node's name)."""
    if hasattr(node, "GetName") and hasattr(node, "GetClassName"):
        return f"'{node.GetName()}' ({node.GetClassName()})"
    return f"{node!r} (a {type(node).__name__}; pass the node, e.g. slicer.util.getNode(name))"


#: In each job's folder: the process id of the Slicer (or Python) that started it.
JOB_OWNER_FILE = "owner.pid"


def _removeAbandonedJobFolders(root):
    """Remove the job folders (each holds an exported CT) whose starting process is gone: a Slicer that was killed
    could not clean up. Folders of live processes (another Slicer's running job) and without an owner file stay."""
    library.libraryRoot()
    from MedDiffFMLib.processes import process_is_gone  # reads no torch into Slicer's process

    for folder in glob.glob(os.path.join(root or tempfile.gettempdir(), "MedDiffFM-*")):
        try:
            with open(os.path.join(folder, JOB_OWNER_FILE)) as owner:
                pid = int(owner.read())
        except (OSError, ValueError):  # no owner file: not ours to judge
            continue
        if process_is_gone(pid):
            shutil.rmtree(folder, ignore_errors=True)


class MedDiffFMTasks:
    """Console-scriptable MedDiffFM tasks on MRML nodes (mixed into MedDiffFMLogic).

    One job runs at a time, whichever logic instance (the panel's, or one made in the console) started it: two
    would compete for the GPU's memory and the CPU cores, and the panel would not show the other's progress.
    """

    _activeRun = None  # the last job started by any instance
    _unfinishedRuns = []  # every job started and not finished yet (a wait=False job ends unpolled; see below)
    _observedScene = None  # the scene whose closing cancels the running job (see _cancelOnSceneClose)

    def __init__(self):
        self.logCallback = logging.info  # called with each output line of a job
        self.progressCallback = None  # called with (step, total)

    # --- tasks -------------------------------------------------------------------------------

    def synthesize(self, referenceVolumeNode=None, size=None, spacing=None, wait=True, **options):
        """Generate a new CT on the grid (and anatomy) of `referenceVolumeNode`, or of `size` (x, y, z
        voxels) and `spacing` (x, y, z mm); without a reference give `region` too. Returns the new node."""
        if referenceVolumeNode is not None and (size is not None or spacing is not None):
            raise ValueError("Give a reference volume or size and spacing, not both: a reference sets the grid.")
        if referenceVolumeNode is None and (size is None or spacing is None):
            raise ValueError("Give a reference volume, or both size (x, y, z voxels) and spacing (x, y, z mm).")
        _checkVolume(referenceVolumeNode)
        arguments, inputs = [], {}
        if referenceVolumeNode is not None:
            inputs["--reference"] = referenceVolumeNode
            name = _resultName(referenceVolumeNode, "synthesize")
        else:
            arguments += ["--size", *_checkTriple("size", size, lambda n, v: _checkWholeNumber(n, v, 1)),
                          "--spacing", *_checkTriple("spacing", spacing, _checkPositiveNumber)]
            name = f"MedDiffFM {TASKS['synthesize'].resultSuffix}"
        return self._runTask("synthesize", None, arguments, wait, options, namedInputs=inputs,
                             importResults=self._importVolume(name, referenceVolumeNode, sameFolder=False))

    def denoise(self, volumeNode, noiseLevel=None, window=None, segmentationNode=None, segmentId=None, wait=True,
                **options):
        """Denoise a CT. `noiseLevel`: noise standard deviation in HU (None = estimate it from the
        image); `window`: (low, high) HU mapped to the model's range; segment `segmentId`, if given: denoise only
        inside it (the rest keeps its values). Returns the new volume node."""
        arguments = []
        if noiseLevel is not None:
            arguments += ["--noise-level", _checkPositiveNumber("noiseLevel", noiseLevel)]
        if window is not None:
            if (isinstance(window, str) or not hasattr(window, "__len__") or len(window) != 2
                    or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                               for v in window) or not window[0] < window[1]):
                raise ValueError(f"window must be two numbers (low, high) in HU with low < high, got {window!r}")
            arguments += ["--window", *window]
        mask = _optionalSegment(segmentationNode, segmentId)
        return self._runTask("denoise", volumeNode, arguments, wait, options, mask=mask)

    def detectAnomalies(self, volumeNode, threshold=None, segmentationNode=None, segmentId=None, wait=True,
                        **options):
        """Detect anomalies (inside segment `segmentId` if given, else the body). `threshold` in HU of
        the map (None = the model's default). Returns (anomaly map volume node in HU, segmentation node
        of the voxels above the threshold)."""
        arguments = [] if threshold is None else ["--threshold", _checkPositiveNumber("threshold", threshold)]
        mask = _optionalSegment(segmentationNode, segmentId)
        _checkVolume(volumeNode)  # before its name is read below
        # Named as the input is named now, as every other task's result (a wait=False job imports them later).
        mapName = _resultName(volumeNode, "detect-anomalies") if volumeNode is not None else None
        segmentationName = f"{volumeNode.GetName()} {ANOMALY_SEGMENTATION_SUFFIX}" if volumeNode is not None else None

        def importResults(workDir):
            mapNode = volumes.addVolumeNodeFromFile(self._outputPath(workDir), mapName, volumeNode)
            anomalySegmentation = volumes.addSegmentationNodeFromMaskFile(
                self._anomalyMaskPath(workDir), segmentationName, ANOMALY_SEGMENTATION_SUFFIX, volumeNode)
            mapNode.GetDisplayNode().SetAndObserveColorNodeID(ANOMALY_COLOR_NODE_ID)
            self._show(volumeNode, foreground=mapNode)
            return mapNode, anomalySegmentation
        return self._runTask(
            "detect-anomalies", volumeNode, arguments, wait, options, importResults=importResults, mask=mask,
            outputArguments=lambda workDir: ["--mask-output", self._anomalyMaskPath(workDir)])

    def superResolve(self, volumeNode, factor=None, wait=True, **options):
        """Super-resolve a thick-slice CT: `factor` thin slices per thick slice (None = the command's
        default, 5). Returns a new volume node on the finer grid."""
        arguments = [] if factor is None else ["--factor", _checkWholeNumber("factor", factor, 2)]
        return self._runTask("super-resolve", volumeNode, arguments, wait, options)

    def generateLesion(self, volumeNode, segmentationNode, segmentId, wait=True, **options):
        """Generate a lesion inside the segment `segmentId`. Returns the new volume node."""
        return self._runTask("generate-lesion", volumeNode, [], wait, options, mask=(segmentationNode, segmentId))

    def inpaint(self, volumeNode, segmentationNode, segmentId, resample=None, wait=True, **options):
        """Replace the region of segment `segmentId` with tissue that fits its surroundings (RePaint;
        `resample` passes per jump, None = the command's default, 1 = fastest). Voxels outside the
        segment keep their values. Returns the new volume node."""
        arguments = [] if resample is None else ["--resample", _checkWholeNumber("resample", resample, 1)]
        return self._runTask("inpaint", volumeNode, arguments, wait, options, mask=(segmentationNode, segmentId))

    # --- the running job ---------------------------------------------------------------------------

    @staticmethod
    def activeJob():
        """The running job (a TaskRun), whichever logic instance started it, or None."""
        active = MedDiffFMTasks._activeRun
        return active if active is not None and active.running else None

    @staticmethod
    def cancelActiveJob():
        """Cancel the running job, if any (its result is not imported); True if there was one."""
        active = MedDiffFMTasks.activeJob()
        if active is not None:
            active.cancel()
        return active is not None

    @staticmethod
    def _cancelUnfinishedJobs():
        """Cancel every job that has not finished, also one whose process has ended but whose results wait for
        poll(): they are not imported (they would land in the next scene), and its folder, holding the exported
        CT, is removed."""
        for run in MedDiffFMTasks._unfinishedRuns:
            try:
                run.cancel()
            except Exception:  # the others must still be stopped (at exit, in a scene close)
                logging.exception("could not cancel a MedDiffFM job")
        MedDiffFMTasks._unfinishedRuns = [run for run in MedDiffFMTasks._unfinishedRuns if not run.finished]

    @staticmethod
    def _cancelOnSceneClose():
        """Closing the scene cancels the unfinished jobs (their results would land in the next scene), also when the
        module panel, which does the same for its own jobs, was never opened. One observer per scene."""
        scene = slicer.mrmlScene
        if MedDiffFMTasks._observedScene is not scene:
            # Only the current scene's closing counts: a scene destroyed when let go of (scripts and tests that
            # replace slicer.mrmlScene) closes too.
            scene.AddObserver(scene.StartCloseEvent, lambda caller, event: caller is slicer.mrmlScene
                              and MedDiffFMTasks._cancelUnfinishedJobs())
            MedDiffFMTasks._observedScene = scene

    # --- shared machinery -----------------------------------------------------------------------

    @staticmethod
    def samplingArguments(model=None, nfe=None, seed=0, forceCpu=False, overlap=None, windowBatch=None,
                          region=None, compileNetwork=False, threads=None, windowSize=None):
        """CLI options shared by all tasks (the `**options` of every task method).

        model: a registered name (bundled, or registered by the user) or a model file (None = the task's own default:
        `denoise`, the base model fine-tuned on CT noise, for denoising; the base model `default` for synthesis and
        anomalies; the fine-tuned ControlNets for super-resolution, lesions, inpainting); nfe: network evaluations
        (None = the task's default); seed: random seed (same seed, same result on the
        same machine and window batch); forceCpu: never use a GPU;
        overlap: sliding-window overlap fraction (0..<1); windowBatch: windows per network call (lower
        it when the GPU runs out of memory); region: head_neck, chest, abdomen or other (None = guess);
        compileNetwork: torch.compile the network (on a GPU about 25 s on the first run, a few seconds later,
        then faster steps: for long runs such as synthesis); threads: CPU threads of the job (None = all cores;
        fewer keep Slicer responsive during a CPU job); windowSize: the sliding window's edge in voxels (None = the
        model's training patch; see --window-size). None means the command line's default for every option.
        """
        for name, value, least in (("nfe", nfe, 1), ("windowBatch", windowBatch, 1), ("threads", threads, 1),
                                   ("windowSize", windowSize, 1), ("seed", seed, 0)):
            if value is not None:
                _checkWholeNumber(name, value, least)
        arguments = ["--device", "cpu" if forceCpu else "auto"]
        if seed is not None:
            arguments += ["--seed", seed]
        if model:
            arguments += ["--model", _modelArgument(model)]
        if region is not None:
            arguments += ["--region", region]
        if nfe is not None:
            arguments += ["--nfe", nfe]
        if overlap is not None:
            arguments += ["--overlap", overlap]
        if windowBatch is not None:
            arguments += ["--window-batch", windowBatch]
        if windowSize is not None:
            arguments += ["--window-size", windowSize]
        if compileNetwork:
            arguments.append("--compile")
        if threads is not None:
            arguments += ["--threads", threads]
        return arguments

    def _runTask(self, task, volumeNode, taskArguments, wait, options, importResults=None,
                 mask=None, namedInputs=None, outputArguments=None):
        """Export the inputs, start the job, and (wait=True) return its imported results.

        importResults(workDir) makes the result nodes; by default one volume named after the input.
        """
        _checkInputs(task, volumeNode, mask)
        if self.activeJob() is not None:
            raise RuntimeError(
                "Another MedDiffFM job is still running (started from the module panel or the Python console). "
                "Wait for it to end, or cancel it (the panel's Cancel button, or "
                "MedDiffFM.MedDiffFMLogic.cancelActiveJob() in the Python console), then start this one.")
        if importResults is None:
            importResults = self._importVolume(_resultName(volumeNode, task), volumeNode)
        if options.get("nfe") is not None and not TASKS[task].usesNfe:
            raise ValueError(f"{TASKS[task].title} has no NFE setting; leave nfe out.")
        samplingArguments = self.samplingArguments(**options)  # rejects unknown option names early
        _removeAbandonedJobFolders(self._temporaryRoot())
        workDir = tempfile.mkdtemp(prefix="MedDiffFM-", dir=self._temporaryRoot())
        try:
            with open(os.path.join(workDir, JOB_OWNER_FILE), "w") as owner:
                owner.write(str(os.getpid()))
            command = [pythonExecutable(), "-m", "MedDiffFMLib", task]
            if volumeNode is not None:
                command.append(self._export(volumeNode, workDir, "input.nrrd"))
            command += ["-o", self._outputPath(workDir)]
            for flag, node in (namedInputs or {}).items():
                command += [flag, self._export(node, workDir, f"{flag.strip('-')}.nrrd")]
            if mask is not None:
                maskPath = os.path.join(workDir, "mask.nrrd")
                volumes.writeSegmentMask(mask[0], mask[1], volumeNode, maskPath)
                command += ["--mask", maskPath]
            if outputArguments is not None:
                command += outputArguments(workDir)
            command += taskArguments + samplingArguments + ["--progress", "machine"]
            # cwd = library root: `python -m` puts the working directory first on sys.path, so the
            # job imports this very copy of MedDiffFMLib whatever else is installed.
            # The results lie on the grid of the CT (or synthesis's reference) as exported now.
            frame = volumes.ExportFrame(volumeNode if volumeNode is not None
                                        else (namedInputs or {}).get("--reference"))

            def importAllOrNothing():  # no half results: a failed import leaves none of its nodes
                with volumes.allOrNothing():
                    results = importResults(workDir)
                    note = frame.place(results if isinstance(results, tuple) else (results,))
                if note:  # once the results are in: a failing log callback must not take them away
                    self.logCallback(note)
                return results

            run = TaskRun(command, workDir, importAllOrNothing, env=self._environment(workDir),
                          cwd=library.libraryRoot(), logCallback=self.logCallback,
                          progressCallback=self.progressCallback)
            self.logCallback(f"Running MedDiffFM {task}...")
            run.start()
        except Exception:  # nothing started: leave no temporary files behind
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        MedDiffFMTasks._activeRun = run
        MedDiffFMTasks._unfinishedRuns = [r for r in MedDiffFMTasks._unfinishedRuns if not r.finished] + [run]
        self._cancelOnSceneClose()
        return run.wait() if wait else run

    @staticmethod
    def _export(volumeNode, workDir, fileName):
        path = os.path.join(workDir, fileName)
        volumes.writeVolumeNode(volumeNode, path)
        return path

    @staticmethod
    def _outputPath(workDir):
        return os.path.join(workDir, "output.nrrd")

    @staticmethod
    def _anomalyMaskPath(workDir):
        return os.path.join(workDir, "anomaly-mask.nrrd")

    def _importVolume(self, name, inputNode, sameFolder=True):
        """The importResults of a task whose result is one volume: a new node named `name`, in the input's
        subject-hierarchy folder unless not `sameFolder` (a synthetic CT is no scan of the reference's patient)."""
        def importResults(workDir):
            node = volumes.addVolumeNodeFromFile(self._outputPath(workDir), name, inputNode, sameFolder)
            volumes.copyWindowLevel(inputNode, node)
            self._show(node)
            return node
        return importResults

    @staticmethod
    def _temporaryRoot():
        app = _slicerApp()
        return app.temporaryPath if app is not None else None

    @staticmethod
    def _environment(workDir):
        # Inside Slicer, start from the environment Slicer itself was started with: the app's own
        # (Qt plugin and library paths) can break the PythonSlicer child.
        env = dict(slicer.util.startupEnvironment() if _slicerApp() is not None else os.environ)
        # TotalSegmentator's copies of the CT go into the job's folder, which is removed after the job, also after a
        # cancel or a crash of Slicer. (Only those: the system temporary folder keeps caches that outlive a job,
        # such as torch.compile's.)
        env["MEDDIFFFM_TEMPORARY_ROOT"] = workDir  # MedDiffFMLib.anatomy.TEMPORARY_ROOT_ENV (importing it loads torch)
        return env

    @staticmethod
    def _show(background, foreground=None):
        if _slicerApp() is None:  # no views without the application
            return
        slicer.util.setSliceViewerLayers(background=background, foreground=foreground,
                                         foregroundOpacity=0.5 if foreground is not None else None, fit=True)


# A job runs in its own process group, so it would outlive Slicer: stop it when Slicer exits (and remove its folder).
atexit.register(MedDiffFMTasks._cancelUnfinishedJobs)

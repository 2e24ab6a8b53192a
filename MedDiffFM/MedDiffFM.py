"""3D Slicer module MedDiffFM: the MedDiff-FM CT diffusion foundation model on volume nodes.

The work happens in a separate `python -m MedDiffFMLib` process (see MedDiffFMUtils.process); this
file holds the Slicer-facing parts: module description, panel, parameter node, Logic and self-test.
"""
import os
from typing import Annotated

import slicer
import vtk
from slicer.util import VTKObservationMixin

try:
    import qt
    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
except ImportError:
    # slicer-core (the MRML layer without the application, used by tests and batch scripts): only the
    # Logic is usable there; the GUI classes get an empty base and are never instantiated.
    class _WithoutApplication:
        pass

    qt = parameterNodeWrapper = None
    ScriptedLoadableModule = ScriptedLoadableModuleLogic = _WithoutApplication
    ScriptedLoadableModuleTest = ScriptedLoadableModuleWidget = _WithoutApplication

from MedDiffFMUtils import dependencies, library, volumes
from MedDiffFMUtils.logic import MedDiffFMTasks
from MedDiffFMUtils.process import TaskCancelled, TimeLeft
from MedDiffFMUtils.tasks import TASKS

MINIMUM_SLICER_VERSION = "5.6"


class MedDiffFM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "MedDiffFM"
        self.parent.categories = ["Filtering"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffFM developers"]
        self.parent.helpText = f"""
CT diffusion foundation model (MedDiff-FM): synthesize, denoise, detect anomalies, super-resolve,
generate lesions and inpaint 3D CT volumes. Results are added as new nodes; inputs are never changed.
Draw masks (lesion site, region to inpaint, or a region to limit denoising or anomaly detection to) as a
segment in the Segment Editor.
Synthesized CTs, generated lesions and inpainted regions lie within the model's HU window for the body
region (for example -120 to 240 HU for the abdomen, -1400 to 400 HU for the chest); elsewhere voxels
outside that window keep the input's values.
The first Apply installs PyTorch, MONAI and other Python packages after asking. A CUDA GPU is used
when present; on the CPU everything works, slowly (lower NFE for a quick preview).
Requires 3D Slicer {MINIMUM_SLICER_VERSION} or later.
"""
        self.parent.acknowledgementText = """
Based on "MedDiff-FM: A Diffusion-based Foundation Model for Versatile Medical Image Applications".
The panel and process handling follow the conventions of the SlicerTotalSegmentator and
SlicerMONAIAuto3DSeg extensions.
"""


if parameterNodeWrapper is not None:
    @parameterNodeWrapper
    class MedDiffFMParameterNode:
        """Panel state, saved with the scene. Noise level / threshold 0 = automatic (scenes saved before used -1, also
        read as automatic: no noise level or threshold of 0 HU is meaningful); nfe and overlap 0 =
        task default; window batch 0 = automatic (4 on the CPU, up to 256 on a GPU); window size 0 = the model's."""
        inputVolume: slicer.vtkMRMLScalarVolumeNode
        maskSegmentation: slicer.vtkMRMLSegmentationNode
        maskSegmentId: str = ""
        model: str = ""  # "" = each task's default model
        task: str = "denoise"
        region: Annotated[str, Choice(["auto", "head_neck", "chest", "abdomen", "other"])] = "auto"
        synthesizeOnInputGrid: bool = True
        synthesizeSizeX: Annotated[int, WithinRange(8, 2048)] = 128
        synthesizeSizeY: Annotated[int, WithinRange(8, 2048)] = 128
        synthesizeSizeZ: Annotated[int, WithinRange(8, 2048)] = 64
        synthesizeSpacingXY: Annotated[float, WithinRange(0.1, 20.0)] = 1.0
        synthesizeSpacingZ: Annotated[float, WithinRange(0.1, 20.0)] = 1.0
        noiseLevel: Annotated[float, WithinRange(-1.0, 1000.0)] = 0.0
        # The anomaly map reaches the width of the model's window: 1800 HU for the chest.
        anomalyThreshold: Annotated[float, WithinRange(-1.0, 2000.0)] = 0.0
        superResolveFactor: Annotated[int, WithinRange(2, 10)] = 5
        nfe: Annotated[int, WithinRange(0, 1000)] = 0
        seed: Annotated[int, WithinRange(0, 2 ** 31 - 1)] = 0
        overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.0
        windowBatch: Annotated[int, WithinRange(0, 1024)] = 0
        windowSize: Annotated[int, WithinRange(0, 256)] = 0
        forceCpu: bool = False


def firstCTVolume(scene):
    """The scene's first CT volume node (not a label map, vector or tensor volume, which the input selector hides), or
    None."""
    for index in range(scene.GetNumberOfNodesByClass(volumes.CT_VOLUME_CLASS)):
        node = scene.GetNthNodeByClass(index, volumes.CT_VOLUME_CLASS)
        if volumes.isCTVolumeNode(node):
            return node
    return None


def modelMismatch(model, kind, task):
    """Why `model` (of `kind`, see library.availableModels) cannot run `task`, or '' when it can or is unknown."""
    if not model or kind is None or kind in TASKS[task].modelKinds:
        return ""
    what = "a base model" if kind == "base" else f"a {kind} ControlNet"
    needs = " or ".join("a base model" if k == "base" else f"a {k} ControlNet" for k in TASKS[task].modelKinds)
    return f"Model '{model}' is {what}; {TASKS[task].title} runs {needs}: choose Task default."


class MedDiffFMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the TaskRun while a job runs
        self._timeLeft = TimeLeft()  # shown on the progress bar
        self._pollTimer = None
        self._dependenciesChecked = False
        self._modelsInstalled = False
        self._modelKinds = {}  # model name -> "base" / the task of a ControlNet / None (unknown)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffFM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedDiffFMLogic()
        self.logic.logCallback = self.addLog
        self.logic.progressCallback = self.onProgress

        for index, info in enumerate(TASKS.values()):
            self.ui.taskTabWidget.setTabText(index, info.title)
        self._populateModels()
        self.ui.progressBar.hide()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.timeout.connect(self._pollRun)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # Widgets the parameter node wrapper cannot bind by itself (dynamic choices, segment ids).
        self.ui.maskSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._onMaskChanged)
        self.ui.maskSegmentSelector.connect("currentSegmentChanged(QString)", self._onMaskChanged)
        self.ui.modelComboBox.currentIndexChanged.connect(self._onModelChanged)
        self.ui.taskTabWidget.currentChanged.connect(self._onTaskChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)

        self.initializeParameterNode()

    def cleanup(self):
        self._cancelAndWait()
        MedDiffFMTasks._cancelUnfinishedJobs()  # those started from the console too, as when Slicer quits
        self.removeObservers()

    def enter(self):
        # Models registered since the panel was last shown (models FILE --register NAME, in a terminal or the console)
        # are listed; the choice in the parameter node is kept (_updateGUI selects it again).
        self.ui.modelComboBox.blockSignals(True)
        self._populateModels()
        self.ui.modelComboBox.blockSignals(False)
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event):
        self._cancelAndWait()  # its results would belong to the scene being closed (the logic cancels console jobs)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = firstCTVolume(slicer.mrmlScene)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self._updateGUI()

    # --- widgets bound by hand ---------------------------------------------------------------------

    def _populateModels(self):
        """'Task default' (each task's own model) first, then every registered model, bundled or the user's."""
        library.libraryRoot()
        from MedDiffFMLib.errors import CheckpointError

        combo = self.ui.modelComboBox
        combo.clear()
        try:
            models = library.availableModels()
        except CheckpointError as error:  # a damaged Resources/Models.json: the panel opens, and says what to do
            models = []
            self.addLog(str(error))
        self._modelsInstalled = bool(models)
        self._modelKinds = {name: kind for name, _description, kind in models}
        combo.addItem("Task default" if models else f"Task default ({library.MODEL_NOT_INSTALLED})", "")
        for name, description, _kind in models:
            combo.addItem(name, name)
            combo.setItemData(combo.count - 1, description, qt.Qt.ToolTipRole)

    def _onModelChanged(self, index):
        if self._parameterNode:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index) or ""

    def _onTaskChanged(self, index):
        p = self._parameterNode
        if p:
            p.task = list(TASKS)[index]
            if modelMismatch(p.model, self._modelKinds.get(p.model), p.task):
                # A model picked on another tab (e.g. the lesion ControlNet) would only fail here.
                self.addLog(f"Model: Task default for {TASKS[p.task].title} ({p.model} does not run it).")
                p.model = ""

    def _onMaskChanged(self, *args):
        if self._parameterNode:
            self._parameterNode.maskSegmentation = self.ui.maskSegmentSelector.currentNode()
            self._parameterNode.maskSegmentId = self.ui.maskSegmentSelector.currentSegmentID() or ""

    def _updateGUI(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        for widget in (self.ui.modelComboBox, self.ui.taskTabWidget, self.ui.maskSegmentSelector):
            widget.blockSignals(True)
        modelIndex = self.ui.modelComboBox.findData(p.model)
        if modelIndex >= 0:
            self.ui.modelComboBox.currentIndex = modelIndex
        elif self.ui.modelComboBox.count:  # saved model gone or none chosen yet: take the first
            p.model = self.ui.modelComboBox.itemData(0) or ""
        self.ui.taskTabWidget.currentIndex = list(TASKS).index(p.task) if p.task in TASKS else 0
        self.ui.maskSegmentSelector.setCurrentNode(p.maskSegmentation)
        self.ui.maskSegmentSelector.setCurrentSegmentID(p.maskSegmentId)
        for widget in (self.ui.modelComboBox, self.ui.taskTabWidget, self.ui.maskSegmentSelector):
            widget.blockSignals(False)
        self._updateApplyButton()

    def _missingInput(self):
        """Why Apply cannot run now, or '' when it can."""
        p = self._parameterNode
        info = TASKS.get(p.task)
        if info is None:
            return "Select a task."
        if not self._modelsInstalled:
            return f"No model available ({library.MODEL_NOT_INSTALLED})."
        needsVolume = p.synthesizeOnInputGrid if p.task == "synthesize" else info.needsInputVolume
        if needsVolume and not p.inputVolume:
            return "Select an input volume."
        if p.task == "synthesize" and not p.synthesizeOnInputGrid and p.region == "auto":
            return "Choose the body region: it can only be guessed from an input volume."
        mismatch = modelMismatch(p.model, self._modelKinds.get(p.model), p.task)
        if mismatch:
            return mismatch
        if info.mask == "required" and not (p.maskSegmentation and p.maskSegmentId):
            return "Select the mask segment (paint it in the Segment Editor)."
        return ""

    def _updateApplyButton(self):
        if self._run is not None:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the running job; the scene stays as it was."
            self.ui.applyButton.enabled = True
            return
        problem = self._missingInput()
        self.ui.applyButton.text = "Apply"
        self.ui.applyButton.toolTip = problem or self._applyToolTip()
        self.ui.applyButton.enabled = not problem

    def _applyToolTip(self):
        """What Apply will run; says so when an optional Mask segment (left from another task) limits it."""
        p = self._parameterNode
        info = TASKS[p.task]
        if info.mask == "optional" and p.maskSegmentation and p.maskSegmentId:
            return f"Run {info.title} inside the selected Mask segment only (clear it to use the whole image)."
        return f"Run {info.title}."

    # --- running -------------------------------------------------------------------------------------

    def addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def onProgress(self, step, total):
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = step
        left = self._timeLeft.text(step, total)
        self.ui.progressBar.format = f"step %v of %m, {left}" if left else "step %v of %m"

    def onApplyButton(self):
        if self._run is not None:
            self.addLog("Cancelling...")
            self._run.cancel()
            return
        # Checked before the log is cleared, so the panel keeps its log. A console call waiting for its job blocks
        # the console, so the panel is where such a job can be cancelled.
        if MedDiffFMTasks.activeJob() is not None:
            if slicer.util.confirmYesNoDisplay(
                    "A MedDiffFM job started from the Python console is still running, and one job runs at a time. "
                    "Cancel it? (Then click Apply again to start this one.)"):
                MedDiffFMTasks.cancelActiveJob()
            return
        with slicer.util.tryWithErrorDisplay("MedDiffFM could not start.", waitCursor=True):
            self._ensureDependencies()
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self._timeLeft = TimeLeft()
            self._run = self._startRun()
            self._setRunning(True)

    def _ensureDependencies(self):
        if self._dependenciesChecked:
            return
        dependencies.setupPythonRequirements(library.libraryRoot(), self.addLog)
        self.addLog(dependencies.computeDeviceMessage())
        self._dependenciesChecked = True

    def _startRun(self):
        p = self._parameterNode
        options = dict(model=p.model or None, seed=p.seed, forceCpu=p.forceCpu, overlap=p.overlap or None,
                       windowBatch=p.windowBatch or None, windowSize=p.windowSize or None,
                       region=None if p.region == "auto" else p.region, wait=False)
        if TASKS[p.task].usesNfe:
            options["nfe"] = p.nfe or None
        # A segment limits a task only when one is chosen; a segmentation without a segment means the whole image.
        segment = dict(segmentationNode=p.maskSegmentation, segmentId=p.maskSegmentId) if (
            p.maskSegmentation and p.maskSegmentId) else dict(segmentationNode=None, segmentId=None)
        if TASKS[p.task].mask == "optional" and segment["segmentId"]:
            self.addLog(f"{TASKS[p.task].title} runs inside the selected Mask segment only.")
        if p.task == "synthesize":
            if p.synthesizeOnInputGrid:
                return self.logic.synthesize(p.inputVolume, **options)
            return self.logic.synthesize(
                size=(p.synthesizeSizeX, p.synthesizeSizeY, p.synthesizeSizeZ),
                spacing=(p.synthesizeSpacingXY, p.synthesizeSpacingXY, p.synthesizeSpacingZ), **options)
        if p.task == "denoise":
            return self.logic.denoise(p.inputVolume, noiseLevel=p.noiseLevel if p.noiseLevel > 0 else None,
                                      **segment, **options)
        if p.task == "detect-anomalies":
            return self.logic.detectAnomalies(
                p.inputVolume, threshold=p.anomalyThreshold if p.anomalyThreshold > 0 else None, **segment, **options)
        if p.task == "super-resolve":
            return self.logic.superResolve(p.inputVolume, factor=p.superResolveFactor, **options)
        if p.task == "generate-lesion":
            return self.logic.generateLesion(p.inputVolume, p.maskSegmentation, p.maskSegmentId, **options)
        return self.logic.inpaint(p.inputVolume, p.maskSegmentation, p.maskSegmentId, **options)

    def _setRunning(self, running):
        self.ui.progressBar.visible = running
        for widget in (self.ui.inputsCollapsibleButton, self.ui.taskTabWidget, self.ui.samplingCollapsibleButton):
            widget.enabled = not running
        if running:
            self._pollTimer.start()
        else:
            self._pollTimer.stop()
        self._updateApplyButton()

    def _cancelAndWait(self):
        """Stop a running job now (module cleanup, scene close): kill it and let it clean up."""
        if self._run is None:
            return
        self._pollTimer.stop()  # no timer slot, and no event handling, while the scene closes under us
        self._run.cancel()
        try:
            self._run.wait(handleEvents=False)
        except TaskCancelled:
            pass
        self._run = None
        self._setRunning(False)

    def _pollRun(self):
        """Timer slot: hand the job's new output to the log/progress bar; finish up when it ends."""
        run = self._run
        if run is None or not run.poll():
            return
        self._run = None
        self._setRunning(False)
        if isinstance(run.error, TaskCancelled):
            self.addLog(str(run.error))
        elif run.error is not None:
            self.addLog(f"Failed: {run.error}")
            slicer.util.errorDisplay(f"MedDiffFM failed: {run.error}")
        else:
            self.addLog("Done.")


class MedDiffFMLogic(ScriptedLoadableModuleLogic, MedDiffFMTasks):
    """Console use: `logic = MedDiffFMLogic(); denoised = logic.denoise(volumeNode, nfe=20, seed=0)`.

    See MedDiffFMUtils.logic.MedDiffFMTasks for every task and option.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        MedDiffFMTasks.__init__(self)

    def getParameterNode(self):
        return MedDiffFMParameterNode(super().getParameterNode())


class MedDiffFMTest(ScriptedLoadableModuleTest):
    """Run in Slicer (Reload and Test, or ctest): geometry survives the trip through files."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ObliqueGeometryRoundTrip()

    def test_ObliqueGeometryRoundTrip(self):
        import tempfile

        import numpy as np
        array = np.arange(6 * 7 * 8, dtype=np.int16).reshape(6, 7, 8)
        angle = np.deg2rad(20)
        ijkToRAS = np.array([[np.cos(angle) * 0.7, -np.sin(angle) * 0.8, 0, -12.5],
                             [np.sin(angle) * 0.7, np.cos(angle) * 0.8, 0, 40.0],
                             [0, 0, 2.5, -100.0],
                             [0, 0, 0, 1]])
        node = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name="CT")
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "ct.nrrd")
            volumes.writeVolumeNode(node, path)
            loaded = volumes.addVolumeNodeFromFile(path, "CT copy")
        np.testing.assert_allclose(volumes.ijkToRASArray(loaded), ijkToRAS, atol=1e-6)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), array)
        self.delayDisplay("Geometry round trip passed")

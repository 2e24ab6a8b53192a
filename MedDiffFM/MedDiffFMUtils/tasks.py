"""The MedDiffFM tasks as the Slicer module offers them: CLI name, GUI title, result naming, inputs."""
from collections import OrderedDict, namedtuple

TaskInfo = namedtuple("TaskInfo", "command title resultSuffix needsInputVolume needsMask usesNfe")
# needsMask: a segment is required (denoise and detect-anomalies take one optionally, as the region to work in);
# usesNfe: the command has --nfe (anomaly detection reconstructs in one step).

# Order = order of the tabs in the module panel.
TASKS = OrderedDict((info.command, info) for info in (
    TaskInfo("synthesize", "Synthesize", "synthesized", False, False, True),
    TaskInfo("denoise", "Denoise", "denoised", True, False, True),
    TaskInfo("detect-anomalies", "Detect anomalies", "anomaly map", True, False, False),
    TaskInfo("super-resolve", "Super-resolve", "super-resolved", True, False, True),
    TaskInfo("generate-lesion", "Generate lesion", "with lesion", True, True, True),
    TaskInfo("inpaint", "Inpaint", "inpainted", True, True, True),
))

ANOMALY_SEGMENTATION_SUFFIX = "anomalies"

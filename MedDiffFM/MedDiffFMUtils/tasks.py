"""The MedDiffFM tasks as the Slicer module offers them: CLI name, GUI title, result naming, inputs."""
from collections import OrderedDict, namedtuple

TaskInfo = namedtuple("TaskInfo", "command title resultSuffix needsInputVolume mask usesNfe")
# mask: the Mask segment is "required" (where to work), "optional" (limits the work to it) or None (not used);
# usesNfe: the command has --nfe (anomaly detection reconstructs in one step).

# Order = order of the tabs in the module panel.
TASKS = OrderedDict((info.command, info) for info in (
    TaskInfo("synthesize", "Synthesize", "synthesized", False, None, True),
    TaskInfo("denoise", "Denoise", "denoised", True, "optional", True),
    TaskInfo("detect-anomalies", "Detect anomalies", "anomaly map", True, "optional", False),
    TaskInfo("super-resolve", "Super-resolve", "super-resolved", True, None, True),
    TaskInfo("generate-lesion", "Generate lesion", "with lesion", True, "required", True),
    TaskInfo("inpaint", "Inpaint", "inpainted", True, "required", True),
))

ANOMALY_SEGMENTATION_SUFFIX = "anomalies"

"""The MedDiffFM tasks as the Slicer module offers them: CLI name, GUI title, result naming, inputs."""
from collections import OrderedDict, namedtuple

TaskInfo = namedtuple("TaskInfo", "command title resultSuffix needsInputVolume needsMask")

# Order = order of the tabs in the module panel.
TASKS = OrderedDict((info.command, info) for info in (
    TaskInfo("synthesize", "Synthesize", "synthesized", False, False),
    TaskInfo("denoise", "Denoise", "denoised", True, False),
    TaskInfo("detect-anomalies", "Detect anomalies", "anomaly map", True, False),
    TaskInfo("super-resolve", "Super-resolve", "super-resolved", True, False),
    TaskInfo("generate-lesion", "Generate lesion", "with lesion", True, True),
    TaskInfo("inpaint", "Inpaint", "inpainted", True, True),
))

ANOMALY_SEGMENTATION_SUFFIX = "anomalies"

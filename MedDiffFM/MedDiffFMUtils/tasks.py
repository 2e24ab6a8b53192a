"""The MedDiffFM tasks as the Slicer module offers them: CLI name, GUI title, result naming, inputs."""
import re
from collections import OrderedDict, namedtuple

TaskInfo = namedtuple("TaskInfo", "command title resultSuffix needsInputVolume mask usesNfe modelKinds")
# mask: the Mask segment is "required" (where to work), "optional" (limits the work to it) or None (not used);
# usesNfe: the command has --nfe (anomaly detection reconstructs in one step); modelKinds: the models it runs,
# "base" or the task a ControlNet was fine-tuned for (see library.availableModels).

# Order = order of the tabs in the module panel.
TASKS = OrderedDict((info.command, info) for info in (
    TaskInfo("synthesize", "Synthesize", "synthesized", False, None, True, ("base",)),
    TaskInfo("denoise", "Denoise", "denoised", True, "optional", True, ("base",)),
    TaskInfo("detect-anomalies", "Detect anomalies", "anomaly map", True, "optional", False, ("base",)),
    TaskInfo("super-resolve", "Super-resolve", "super-resolved", True, None, True, ("super-resolution",)),
    TaskInfo("generate-lesion", "Generate lesion", "with lesion", True, "required", True, ("lesion",)),
    TaskInfo("inpaint", "Inpaint", "inpainted", True, "required", True, ("lesion", "base")),
))

# Command line options that the job's messages may suggest, as a Slicer user sets them:
# (keyword argument of the console methods, the panel's field or None).
OPTIONS_IN_SLICER = OrderedDict((
    ("--noise-level", ("noiseLevel", "Noise level")),
    ("--threshold", ("threshold", "Threshold")),
    ("--mask", ("segmentationNode + segmentId", "Mask segment")),
    ("--window-size", ("windowSize", "Window size")),
    ("--window-batch", ("windowBatch", "Window batch")),
    ("--window", ("window", None)),
    ("--overlap", ("overlap", "Window overlap")),
    ("--nfe", ("nfe", "NFE")),
    ("--device", ("forceCpu=True", "Force CPU")),
    ("--region", ("region", "Body region")),
    ("--model", ("model", "Model")),
    ("--factor", ("factor", "Factor")),
    ("--compile", ("compileNetwork=True", None)),
    ("--threads", ("threads", None)),
    ("--seed", ("seed", "Random seed")),
))


def inSlicerTerms(message):
    """`message` from the command line, followed by what its options are called in Slicer."""
    mentioned = [(flag, names) for flag, names in OPTIONS_IN_SLICER.items()
                 if re.search(re.escape(flag) + r"(?![\w-])", message)]
    if not mentioned:
        return message
    terms = "; ".join(f"{flag} is " + (f"{panel} in the panel, " if panel else "") + f"{keyword} in the console"
                      for flag, (keyword, panel) in mentioned)
    return f"{message}\n(In Slicer: {terms}.)"

ANOMALY_SEGMENTATION_SUFFIX = "anomalies"

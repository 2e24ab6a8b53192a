"""MRML nodes <-> image files for the MedDiffFMLib command line.

Volumes go out through SimpleITK (the reader MedDiffFMLib itself uses) with the node's IJK-to-RAS
geometry converted to LPS, and come back the same way into *new* nodes: input nodes are only read.
Works in the Slicer application and under slicer-core (no `slicer.modules`, no Qt).
"""
import contextlib

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from .geometry import ijkToRASFromSitkGeometry, sitkGeometryFromIJKToRAS


#: The volume node class of a CT: the class the panel's input selector lists. Its subclasses are label maps, vector
#: (RGB), diffusion-weighted and tensor volumes, never a grayscale CT.
CT_VOLUME_CLASS = "vtkMRMLScalarVolumeNode"


def isCTVolumeNode(node):
    """Whether `node` is a grayscale volume node of the kind a CT is loaded into (not one of its subclasses)."""
    return hasattr(node, "GetClassName") and node.GetClassName() == CT_VOLUME_CLASS


def ijkToRASArray(volumeNode):
    """The 4x4 IJK-to-RAS matrix of the node's voxel array, whose first voxel is the image data's extent start
    (usually 0, 0, 0; not always for image data made by VTK filters)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRAS = slicer.util.arrayFromVTKMatrix(matrix)
    image = volumeNode.GetImageData()
    if image is not None:
        start = np.array(image.GetExtent()[::2], dtype=float)
        ijkToRAS[:3, 3] += ijkToRAS[:3, :3] @ start
    return ijkToRAS


def _writeArray(array, ijkToRAS, path):
    image = sitk.GetImageFromArray(array)  # copies, so the node's voxels are never touched
    spacing, origin, direction = sitkGeometryFromIJKToRAS(ijkToRAS)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=False)


def writeVolumeNode(volumeNode, path):
    """Write a scalar volume node's voxels and geometry to `path` (NRRD or NIfTI by extension).

    The geometry is the node's own (local) grid; a parent transform is not applied, and results are
    placed under the same transform (see `addVolumeNodeFromFile`).
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("The input volume is empty: select a volume that has been loaded.")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise ValueError(f"'{volumeNode.GetName()}' is not a single-component (scalar) volume; "
                         "MedDiffFM needs a grayscale CT.")
    _writeArray(slicer.util.arrayFromVolume(volumeNode), ijkToRASArray(volumeNode), path)


def _sceneNodes():
    scene = slicer.mrmlScene
    return [scene.GetNthNode(index) for index in range(scene.GetNumberOfNodes())]


def _removeNodesAddedSince(before):
    """Remove the nodes whose IDs are not in `before`; singletons (subject hierarchy) are shared and stay."""
    for node in _sceneNodes():
        if node.GetID() not in before and not node.GetSingletonTag():
            slicer.mrmlScene.RemoveNode(node)


@contextlib.contextmanager
def _scratchNodes():
    """Remove every node added to the scene inside the block: labelmap conversions add a labelmap,
    its display node and a colour table each time."""
    before = {node.GetID() for node in _sceneNodes()}
    try:
        yield
    finally:
        _removeNodesAddedSince(before)


@contextlib.contextmanager
def allOrNothing():
    """Keep the nodes added inside the block only if it completes: a result imported in part (one of its two nodes,
    or a node whose display could not be set up) is removed with its display and storage nodes."""
    before = {node.GetID() for node in _sceneNodes()}
    try:
        yield
    except BaseException:
        _removeNodesAddedSince(before)
        raise


def _segmentIsEmpty(segmentationNode, segmentId):
    """Whether a segment painted as a labelmap holds no voxel. Checked on its own grid: an empty segment may share
    its layer with painted ones, and on another grid than the CT's its export fails without saying why."""
    segmentation = segmentationNode.GetSegmentation()
    labelmap = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation.GetSourceRepresentationName() != labelmap:
        return False  # a surface is judged after its conversion to the CT's grid
    own = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentId, own):
        return False
    scalars = own.GetPointData().GetScalars()
    if own.IsEmpty() or scalars is None:
        return True
    return not (vtk_to_numpy(scalars) == segmentation.GetSegment(segmentId).GetLabelValue()).any()


_NO_VOXELS = ("Segment '{segment}' has no voxels inside '{volume}': paint the region in the Segment Editor first or, "
              "if it is painted, check that it lies over this volume (drawn on another volume, or under another "
              "transform).")


def writeSegmentMask(segmentationNode, segmentId, referenceVolumeNode, path):
    """Write one segment as a 0/1 uint8 mask on the grid of `referenceVolumeNode`."""
    segmentation = segmentationNode.GetSegmentation()
    if segmentId and segmentation.GetSegment(segmentId) is None:  # a console user may give the name shown in Slicer
        names = {segmentation.GetNthSegmentID(i): segmentation.GetNthSegment(i).GetName()
                 for i in range(segmentation.GetNumberOfSegments())}
        # As Slicer looks names up: regardless of case, an exact match first.
        named = ([i for i, n in names.items() if n == segmentId]
                 or [i for i, n in names.items() if n.lower() == segmentId.lower()])
        if len(named) > 1:
            raise ValueError(f"{len(named)} segments of '{segmentationNode.GetName()}' are named '{segmentId}': give "
                             f"the ID of the one that marks the region ({', '.join(named)}), or rename the others.")
        segmentId = named[0] if named else segmentId
    segment = segmentation.GetSegment(segmentId) if segmentId else None
    if segment is None:
        raise ValueError(f"Segment '{segmentId}' not found in '{segmentationNode.GetName()}' (by ID or by name): "
                         "select the segment that marks the region.")
    if _segmentIsEmpty(segmentationNode, segmentId):
        raise ValueError(_NO_VOXELS.format(segment=segment.GetName(), volume=referenceVolumeNode.GetName()))
    with _scratchNodes():
        # Export from a copy of the one segment: converting a closed-surface segment to a labelmap would
        # otherwise add that representation to the user's segmentation.
        copyNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        copy = copyNode.GetSegmentation()
        copy.SetSourceRepresentationName(segmentation.GetSourceRepresentationName())
        copy.CopyConversionParameters(segmentation)
        if not copy.CopySegmentFromSegmentation(segmentation, segmentId):
            raise ValueError(f"Segment '{segment.GetName()}' could not be copied for export.")
        _underSameTransform(copyNode, segmentationNode)
        copyNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)  # convert at CT resolution
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        segmentIds = vtk.vtkStringArray()
        segmentIds.InsertNextValue(segmentId)
        exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            copyNode, segmentIds, labelmapNode, referenceVolumeNode)
        image = labelmapNode.GetImageData()
        if not exported or image is None or image.GetPointData().GetScalars() is None:
            raise ValueError(f"Segment '{segment.GetName()}' could not be turned into a mask on the grid "
                             f"of '{referenceVolumeNode.GetName()}'.")
        mask = (slicer.util.arrayFromVolume(labelmapNode) > 0).astype(np.uint8)
        maskToRAS = ijkToRASArray(labelmapNode)
    if not mask.any():
        raise ValueError(_NO_VOXELS.format(segment=segment.GetName(), volume=referenceVolumeNode.GetName()))
    _writeArray(mask, maskToRAS, path)


def readImage(path):
    """Read an image file; return (voxel array zyx, 4x4 IJK-to-RAS matrix)."""
    image = sitk.ReadImage(str(path))
    ijkToRAS = ijkToRASFromSitkGeometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    return sitk.GetArrayFromImage(image), ijkToRAS


def _underSameTransform(node, likeNode):
    """Put a new node under the same parent transform as the node it was made from."""
    if likeNode is not None and likeNode.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(likeNode.GetParentTransformNode().GetID())


class ExportFrame:
    """Where an exported node lay when its job started: its parent transform and its own IJK-to-RAS. A job's results
    are on that local grid. `_placeLike` puts them under the node's transform at import, which is right while the node
    keeps its grid (moved under another transform since, the results follow it). `place` covers the rest: a node
    hardened, moved by an edit of its origin, or removed during the job."""

    def __init__(self, node):
        self.node = node
        self.transformID = node.GetTransformNodeID() if node is not None else None
        self.ijkToRAS = ijkToRASArray(node) if node is not None else None

    def place(self, nodes):
        """Put the result `nodes` under the transform of the start when the exported node no longer stands on its
        exported grid; returns a note for the log then, else None."""
        node = self.node
        if node is None or (slicer.mrmlScene.IsNodePresent(node) and node.GetImageData() is not None
                            and np.allclose(ijkToRASArray(node), self.ijkToRAS, atol=1e-6)):
            return None
        transform = slicer.mrmlScene.GetNodeByID(self.transformID) if self.transformID else None
        for result in nodes:
            result.SetAndObserveTransformNodeID(transform.GetID() if transform is not None else None)
        where = ("without a transform" if self.transformID is None else
                 f"under its transform '{transform.GetName()}'" if transform is not None else
                 "without its transform, which has been deleted since (they may lie off by that transform)")
        return (f"'{node.GetName()}' was hardened, moved or removed while the job ran: the results are placed where it "
                f"lay when the job started, {where}.")


def _placeLike(node, likeNode, sameFolder=True):
    """Put a result beside the node it was made from: under the same parent transform and (`sameFolder`), in the
    subject hierarchy, in the same folder (a CT loaded from DICOM keeps its results in its patient's study)."""
    _underSameTransform(node, likeNode)
    if likeNode is None or not sameFolder:
        return
    hierarchy = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode")  # never made here
    likeItem = hierarchy.GetItemByDataNode(likeNode) if hierarchy is not None else 0
    if likeItem:
        parent = hierarchy.GetItemParent(likeItem)
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:  # the Slicer application makes every node's item; a bare scene (slicer-core) makes none
            hierarchy.CreateItem(parent, node)


def addVolumeNodeFromFile(path, name, likeNode=None, sameFolder=True):
    """Load an image file into a new scalar volume node (geometry from the file), named `name`, or
    `name_1`, `name_2`, ... when that name is taken, so repeated runs can be told apart; placed like `likeNode`
    (`_placeLike`)."""
    array, ijkToRAS = readImage(path)
    node = slicer.util.addVolumeFromArray(array, ijkToRAS=ijkToRAS, name=slicer.mrmlScene.GenerateUniqueName(name))
    _placeLike(node, likeNode, sameFolder)
    return node


def copyWindowLevel(fromNode, toNode):
    """Show a CT result (denoised, super-resolved, inpainted) as its input is shown, so the two compare at a
    glance: same window/level and colour table, unless the input has no display yet (then Slicer's automatic
    window/level stays)."""
    source = fromNode.GetDisplayNode() if fromNode is not None else None
    target = toNode.GetDisplayNode()
    if source is None or target is None:
        return
    target.SetAutoWindowLevel(source.GetAutoWindowLevel())
    if not source.GetAutoWindowLevel():
        target.SetWindowLevel(source.GetWindow(), source.GetLevel())
    if source.GetColorNodeID():
        target.SetAndObserveColorNodeID(source.GetColorNodeID())


def addSegmentationNodeFromMaskFile(path, name, segmentName, likeNode=None):
    """Load a 0/1 mask file into a new segmentation node holding one segment named `segmentName`."""
    array, ijkToRAS = readImage(path)
    with allOrNothing():
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                              slicer.mrmlScene.GenerateUniqueName(name))
        segmentationNode.CreateDefaultDisplayNodes()
        with _scratchNodes():
            labelmapNode = slicer.util.addVolumeFromArray((array > 0).astype(np.uint8), ijkToRAS=ijkToRAS,
                                                          nodeClassName="vtkMRMLLabelMapVolumeNode")
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode,
                                                                                           segmentationNode):
                raise RuntimeError(f"Could not import the mask {path} as a segmentation.")
        segmentation = segmentationNode.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:  # nothing found: say so with an empty segment
            segmentation.AddEmptySegment(segmentName, segmentName)
        else:  # the import names it after a colour table entry
            segmentation.GetNthSegment(0).SetName(segmentName)
        _placeLike(segmentationNode, likeNode)
    return segmentationNode

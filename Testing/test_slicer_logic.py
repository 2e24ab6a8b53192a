"""The Slicer module's Logic on the real MRML layer (slicer-core: MRML scene and nodes, no Qt app).

Real CT from ../shared/data/ct goes into volume nodes; files written for the command line are read
back with plain SimpleITK and compared with geometry computed here independently. The process
runner is tested against small scripts with known behaviour (progress, failure, cancel with a
grandchild process); the Logic's task methods against a stand-in `MedDiffFMLib` package whose
`__main__` does a simple known transformation, and against the real command line where it exists.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import types

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ABDOMEN_SMALL_NII, LIMB_MASK_NII, LIMB_NII, REPO

sys.path.insert(0, str(REPO / "MedDiffFM"))  # where Slicer finds the module (its module path)

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402

import MedDiffFM  # noqa: E402
from MedDiffFMUtils import geometry, library, process, volumes  # noqa: E402
from MedDiffFMUtils import logic as logic_module  # noqa: E402

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# What Slicer's Segmentations module registers at application start (empty segments need it).
_converters = slicer.vtkSegmentationConverterFactory.GetInstance()
if not _converters.GetConverterRules():
    _converters.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    _converters.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


@pytest.fixture
def scene():
    slicer.mrmlScene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()  # what the application does at start: default colour tables
    colors.SetMRMLScene(slicer.mrmlScene)
    yield slicer.mrmlScene
    colors.SetMRMLScene(None)
    slicer.mrmlScene.Clear(1)


def scene_nodes():
    """IDs of the scene's nodes, less shared singletons (the subject hierarchy appears on first use)."""
    scene = slicer.mrmlScene
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return {node.GetID() for node in nodes if not node.GetSingletonTag()}


def oblique(image, degrees=15.0):
    """The same voxels tilted about z: a direction matrix that is not diagonal."""
    a = np.deg2rad(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    tilted = sitk.Image(image)
    tilted.SetDirection(tuple((rotation @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    return tilted


def crop(image, size=(48, 48, 16)):
    start = [(full - part) // 2 for full, part in zip(image.GetSize(), size)]
    return sitk.RegionOfInterest(image, size, start)


def ijk_to_ras_by_hand(image):
    """IJK-to-RAS of a SimpleITK image written out from the definitions (independent of geometry.py)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return matrix


def node_from_image(image, name):
    return slicer.util.addVolumeFromArray(sitk.GetArrayFromImage(image), ijkToRAS=ijk_to_ras_by_hand(image), name=name)


@pytest.fixture
def ct_image():
    return oblique(crop(sitk.ReadImage(str(ABDOMEN_SMALL_NII))))


@pytest.fixture
def ct_node(scene, ct_image):
    return node_from_image(ct_image, "CT")


@pytest.fixture(autouse=True)
def no_job_left_running():
    """A test that fails while its job runs must not block the next tests' jobs (one job at a time)."""
    yield
    logic_module.MedDiffFMTasks._cancelUnfinishedJobs()
    logic_module.MedDiffFMTasks._activeRun = None


def assert_same_geometry(image, reference):
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)
    assert image.GetSize() == reference.GetSize()


# --- geometry ---------------------------------------------------------------------------------------


def test_geometry_known_answer():
    # x axis along R with 0.5 mm, y along A with 0.8 mm, z along -S (slices stored head-first) 3 mm.
    ijk_to_ras = np.array([[0.5, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, -3.0, 30.0], [0, 0, 0, 1]])
    spacing, origin, direction = geometry.sitkGeometryFromIJKToRAS(ijk_to_ras)
    assert spacing == pytest.approx((0.5, 0.8, 3.0))
    assert origin == pytest.approx((-10.0, 20.0, 30.0))  # LPS: x and y change sign
    assert direction == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, -1))
    np.testing.assert_allclose(geometry.ijkToRASFromSitkGeometry(spacing, origin, direction), ijk_to_ras)


def test_a_volume_with_a_broken_geometry_is_refused_before_any_work(ct_node, fake_cli):
    """A matrix with a zero column becomes NaN directions in Slicer: the job used to run, and its result landed on
    another grid."""
    matrix = volumes.ijkToRASArray(ct_node)
    matrix[:3, 2] = 0.0
    broken = slicer.util.addVolumeFromArray(slicer.util.arrayFromVolume(ct_node).copy(), ijkToRAS=matrix,
                                            name="broken")
    assert not np.isfinite(volumes.ijkToRASArray(broken)).all()
    nodes_before = scene_nodes()
    with pytest.raises(ValueError, match="IJK-to-RAS matrix holds NaN or infinite values"):
        MedDiffFM.MedDiffFMLogic().denoise(broken)
    assert scene_nodes() == nodes_before


# --- node <-> file ------------------------------------------------------------------------------------


def test_exported_volume_has_node_voxels_and_geometry(ct_node, ct_image, tmp_path):
    before = slicer.util.arrayFromVolume(ct_node).copy()
    matrix_before = volumes.ijkToRASArray(ct_node)
    path = tmp_path / "ct.nrrd"
    volumes.writeVolumeNode(ct_node, path)

    written = sitk.ReadImage(str(path))
    assert_same_geometry(written, ct_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(ct_image))
    # the input node is only read
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct_node), before)
    np.testing.assert_array_equal(volumes.ijkToRASArray(ct_node), matrix_before)


def test_imported_result_lands_on_input_grid_under_its_transform(ct_node, ct_image, tmp_path):
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    result = sitk.Cast(ct_image, sitk.sitkFloat32) + 5.0  # what a task would write: same grid
    path = tmp_path / "out.nrrd"
    sitk.WriteImage(result, str(path))

    node = volumes.addVolumeNodeFromFile(path, "CT denoised", likeNode=ct_node)
    assert node.GetName() == "CT denoised"
    np.testing.assert_allclose(volumes.ijkToRASArray(node), volumes.ijkToRASArray(ct_node), atol=1e-5)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(node), slicer.util.arrayFromVolume(ct_node) + 5.0)
    assert node.GetTransformNodeID() == transform.GetID()


def sphere_segmentation(volume_node, center_ijk, radius_vox):
    """A segmentation with one spherical segment, stored (like the Segment Editor does) on a sub-extent."""
    shape = slicer.util.arrayFromVolume(volume_node).shape
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    ck, cj, ci = center_ijk
    full = ((i - ci) ** 2 + (j - cj) ** 2 + ((k - ck) * 2) ** 2 <= radius_vox ** 2).astype(np.uint8)
    # keep only the bounding box of the sphere, with the box's own origin
    half_extent = (radius_vox // 2 + 1, radius_vox, radius_vox)  # z voxels are counted double above
    box = tuple(slice(max(c - r, 0), c + r + 1) for c, r in zip((ck, cj, ci), half_extent))
    offset = np.array([box[2].start, box[1].start, box[0].start, 1.0])
    ijk_to_ras = volumes.ijkToRASArray(volume_node)
    box_to_ras = ijk_to_ras.copy()
    box_to_ras[:, 3] = ijk_to_ras @ offset
    labelmap = slicer.util.addVolumeFromArray(full[box].copy(), ijkToRAS=box_to_ras, name="lesion",
                                              nodeClassName="vtkMRMLLabelMapVolumeNode")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    slicer.mrmlScene.RemoveNode(labelmap)
    return segmentation, segmentation.GetSegmentation().GetNthSegmentID(0), full


def test_segment_exported_as_mask_on_volume_grid(ct_node, ct_image, tmp_path):
    segmentation, segment_id, expected = sphere_segmentation(ct_node, center_ijk=(8, 20, 26), radius_vox=6)
    path = tmp_path / "mask.nrrd"
    nodes_before = scene_nodes()
    volumes.writeSegmentMask(segmentation, segment_id, ct_node, path)
    assert scene_nodes() == nodes_before  # the conversion's labelmap, display and colour nodes are gone

    mask = sitk.ReadImage(str(path))
    assert_same_geometry(mask, ct_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected)
    # A console user may name the segment as Slicer shows it, not by its ID.
    name = segmentation.GetSegmentation().GetSegment(segment_id).GetName()
    assert name != segment_id
    volumes.writeSegmentMask(segmentation, name, ct_node, tmp_path / "by-name.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "by-name.nrrd"))), expected)


def test_image_data_not_starting_at_voxel_zero_is_exported_where_slicer_shows_it(ct_node, tmp_path):
    """VTK filters can leave image data whose extent starts past 0; its first voxel lies that far along the axes."""
    array = slicer.util.arrayFromVolume(ct_node).copy()
    nz, ny, nx = array.shape
    image = vtk.vtkImageData()
    image.SetExtent(5, 5 + nx - 1, 2, 2 + ny - 1, 0, nz - 1)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    shifted = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "shifted CT")
    matrix = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(matrix)
    shifted.SetIJKToRASMatrix(matrix)
    shifted.SetAndObserveImageData(image)
    slicer.util.arrayFromVolume(shifted)[:] = array
    volumes.writeVolumeNode(shifted, tmp_path / "ct.nrrd")
    written = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    first_voxel_ras = slicer.util.arrayFromVTKMatrix(matrix) @ np.array([5, 2, 0, 1.0])
    np.testing.assert_allclose(written.GetOrigin(), LPS_TO_RAS @ first_voxel_ras[:3], atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), array)
    # A segment painted over it lands on the same voxels of the written mask.
    segmentation, segment_id, expected = sphere_segmentation(shifted, center_ijk=(8, 20, 26), radius_vox=6)
    volumes.writeSegmentMask(segmentation, segment_id, shifted, tmp_path / "mask.nrrd")
    mask = sitk.ReadImage(str(tmp_path / "mask.nrrd"))
    assert_same_geometry(mask, written)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), expected)


def test_the_panel_starts_on_a_ct_not_a_label_map(ct_node):
    slicer.mrmlScene.RemoveNode(ct_node)
    slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    assert MedDiffFM.firstCTVolume(slicer.mrmlScene) is None
    for kind in ("vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLDiffusionTensorVolumeNode"):
        slicer.mrmlScene.AddNewNodeByClass(kind, kind)
    assert MedDiffFM.firstCTVolume(slicer.mrmlScene) is None
    ct = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    assert MedDiffFM.firstCTVolume(slicer.mrmlScene) is ct


def test_one_segment_of_a_shared_labelmap_is_exported_alone(ct_node, ct_image, tmp_path):
    """Segments painted in one layer share a labelmap: only the chosen one becomes the mask, and the user's
    segmentation is left as it was."""
    labels = np.zeros(slicer.util.arrayFromVolume(ct_node).shape, np.uint8)
    labels[6:10, 10:20, 10:20] = 1
    labels[6:10, 25:35, 25:35] = 2
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    slicer.util.updateVolumeFromArray(labelmap, labels)
    matrix = vtk.vtkMatrix4x4()
    ct_node.GetIJKToRASMatrix(matrix)
    labelmap.SetIJKToRASMatrix(matrix)
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Layers")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    slicer.mrmlScene.RemoveNode(labelmap)
    inner = segmentation.GetSegmentation()
    first, second = inner.GetNthSegmentID(0), inner.GetNthSegmentID(1)
    assert inner.GetNumberOfLayers() == 1 and inner.GetNumberOfSegments() == 2  # label values 1 and 2, one layer
    modified = segmentation.GetMTime()
    volumes.writeSegmentMask(segmentation, second, ct_node, tmp_path / "m.nrrd")
    mask = sitk.ReadImage(str(tmp_path / "m.nrrd"))
    assert_same_geometry(mask, ct_image)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), (labels == 2).astype(np.uint8))
    assert segmentation.GetMTime() == modified and inner.GetNumberOfSegments() == 2 and inner.GetSegment(first)


def test_closed_surface_segment_exported_without_changing_the_segmentation(ct_node, ct_image, tmp_path):
    center_ras = volumes.ijkToRASArray(ct_node) @ np.array([24, 24, 8, 1.0])
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*center_ras[:3])
    sphere.SetRadius(6.0)
    sphere.SetThetaResolution(32)
    sphere.SetPhiResolution(32)
    sphere.Update()
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Drawn")
    segmentation.GetSegmentation().SetSourceRepresentationName("Closed surface")
    segment_id = segmentation.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball")
    modified = segmentation.GetMTime()

    volumes.writeSegmentMask(segmentation, segment_id, ct_node, tmp_path / "m.nrrd")
    segment = segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment.GetRepresentation("Binary labelmap") is None  # no representation added to the user's node
    assert segmentation.GetMTime() == modified
    mask = sitk.ReadImage(str(tmp_path / "m.nrrd"))
    assert_same_geometry(mask, ct_image)
    ball_volume = 4 / 3 * np.pi * 6.0 ** 3
    assert sitk.GetArrayFromImage(mask).sum() * np.prod(ct_image.GetSpacing()) == pytest.approx(ball_volume, rel=0.25)


@pytest.mark.parametrize("where", ["ct under a transform", "segmentation under another transform", "both"])
def test_segment_drawn_over_a_transformed_ct_is_exported_on_its_local_grid(ct_node, tmp_path, where):
    """A job runs on the CT's own grid, without its transform: a segment painted where the CT is shown (world
    coordinates, or under a transform of its own) must reach the same CT voxels, at any rotation."""
    def rigid(name, degrees, shift):
        a = np.deg2rad(degrees)
        matrix = vtk.vtkMatrix4x4()
        for i, row in enumerate([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]):
            for j, value in enumerate(row):
                matrix.SetElement(i, j, value)
            matrix.SetElement(i, 3, shift[i])
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        transform.SetMatrixTransformToParent(matrix)
        return transform

    def to_world(transform):
        if transform is None:
            return np.eye(4)
        matrix = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    ct_transform = rigid("registration", 20.0, (5.0, -3.0, 2.0)) if where != "segmentation under another transform" \
        else None
    segmentation_transform = rigid("segmentation's", -15.0, (2.0, 4.0, -1.0)) if where != "ct under a transform" \
        else None
    if ct_transform is not None:
        ct_node.SetAndObserveTransformNodeID(ct_transform.GetID())
    labels = np.zeros(slicer.util.arrayFromVolume(ct_node).shape, np.uint8)
    labels[6:10, 12:22, 20:30] = 1
    # Painted on the CT's voxels as they are shown, stored in the segmentation's own coordinates.
    drawn_to_local = np.linalg.inv(to_world(segmentation_transform)) @ to_world(ct_transform) @ \
        volumes.ijkToRASArray(ct_node)
    labelmap = slicer.util.addVolumeFromArray(labels, ijkToRAS=drawn_to_local,
                                              nodeClassName="vtkMRMLLabelMapVolumeNode")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    slicer.mrmlScene.RemoveNode(labelmap)
    if segmentation_transform is not None:
        segmentation.SetAndObserveTransformNodeID(segmentation_transform.GetID())
    volumes.writeSegmentMask(segmentation, segmentation.GetSegmentation().GetNthSegmentID(0), ct_node,
                             tmp_path / "m.nrrd")
    mask = sitk.ReadImage(str(tmp_path / "m.nrrd"))
    np.testing.assert_allclose(geometry.ijkToRASFromSitkGeometry(mask.GetSpacing(), mask.GetOrigin(),
                                                                 mask.GetDirection()),
                               volumes.ijkToRASArray(ct_node), atol=1e-4)  # the local grid, not the world's
    got = sitk.GetArrayFromImage(mask)
    if where == "both":  # Slicer resamples through both transforms: a voxel on the segment's edge may flip
        assert np.count_nonzero(got != labels) <= 0.05 * labels.sum()
    else:
        np.testing.assert_array_equal(got, labels)


def test_empty_or_unknown_segment_is_refused(ct_node, tmp_path):
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    empty_id = segmentation.GetSegmentation().AddEmptySegment("lesion")
    with pytest.raises(ValueError, match="has no voxels inside"):
        volumes.writeSegmentMask(segmentation, empty_id, ct_node, tmp_path / "m.nrrd")
    # An empty segment beside a painted one on a finer grid than the CT's: the same message, not a failed export.
    finer = volumes.ijkToRASArray(ct_node)
    finer[:3, :3] /= 2
    painted = np.zeros((8, 16, 16), np.uint8)
    painted[2:5, 4:10, 4:10] = 1
    labelmap = slicer.util.addVolumeFromArray(painted, ijkToRAS=finer, nodeClassName="vtkMRMLLabelMapVolumeNode")
    drawn = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, drawn)
    empty_beside = drawn.GetSegmentation().AddEmptySegment("empty", "empty")
    with pytest.raises(ValueError, match="Segment 'empty' has no voxels inside 'CT'"):
        volumes.writeSegmentMask(drawn, empty_beside, ct_node, tmp_path / "m.nrrd")
    # Two segments of one name: which one was meant cannot be guessed.
    drawn.GetSegmentation().GetSegment(empty_beside).SetName("lesion")
    drawn.GetSegmentation().GetNthSegment(0).SetName("lesion")
    with pytest.raises(ValueError, match="2 segments of 'drawn' are named 'lesion': give the ID"):
        volumes.writeSegmentMask(drawn, "lesion", ct_node, tmp_path / "m.nrrd")
    # Names are looked up as Slicer does, regardless of case, an exact match first.
    drawn.GetSegmentation().GetSegment(empty_beside).SetName("Lesion")
    with pytest.raises(ValueError, match="Segment 'Lesion' has no voxels"):
        volumes.writeSegmentMask(drawn, "Lesion", ct_node, tmp_path / "m.nrrd")
    drawn.GetSegmentation().GetSegment(empty_beside).SetName("other")
    volumes.writeSegmentMask(drawn, "LESION", ct_node, tmp_path / "painted.nrrd")  # the painted one
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "painted.nrrd"))).any()
    with pytest.raises(ValueError, match="not found"):
        volumes.writeSegmentMask(segmentation, "nonexistent", ct_node, tmp_path / "m.nrrd")
    assert not (tmp_path / "m.nrrd").exists()


def test_mask_file_becomes_segmentation_node(ct_node, tmp_path):
    mask_image = sitk.ReadImage(str(LIMB_MASK_NII))  # real GTV mask, on the limb CT's grid
    path = tmp_path / "gtv.nrrd"
    sitk.WriteImage(mask_image, str(path))
    limb = node_from_image(sitk.ReadImage(str(LIMB_NII)), "limb")

    node = volumes.addSegmentationNodeFromMaskFile(path, "limb anomalies", "anomalies", likeNode=limb)
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    segment_id = node.GetSegmentation().GetNthSegmentID(0)
    assert node.GetSegmentation().GetSegment(segment_id).GetName() == "anomalies"
    back = tmp_path / "back.nrrd"
    volumes.writeSegmentMask(node, segment_id, limb, back)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(back))),
                                  (sitk.GetArrayFromImage(mask_image) > 0).astype(np.uint8))

    nothing = tmp_path / "nothing.nrrd"  # no anomaly found: the segmentation says so with an empty segment
    sitk.WriteImage(mask_image * 0, str(nothing))
    empty = volumes.addSegmentationNodeFromMaskFile(nothing, "limb anomalies", "anomalies", likeNode=limb)
    assert empty.GetSegmentation().GetNumberOfSegments() == 1
    assert empty.GetSegmentation().GetNthSegment(0).GetName() == "anomalies"


# --- process runner ----------------------------------------------------------------------------------


def test_progress_lines_are_recognised_exactly():
    assert process.parseProgressLine("MEDDIFFFM_PROGRESS 3 20") == (3, 20)
    assert process.parseProgressLine("MEDDIFFFM_PROGRESS 3") is None
    assert process.parseProgressLine("MEDDIFFFM_PROGRESS a b") is None
    assert process.parseProgressLine("INFO MEDDIFFFM_PROGRESS 3 20") is None


def script(tmp_path, body):
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def make_run(command, tmp_path, result="imported"):
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    events = {"log": [], "progress": [], "imported": 0}

    def import_results():
        events["imported"] += 1
        return result
    run = process.TaskRun(command, str(work_dir), import_results, logCallback=events["log"].append,
                          progressCallback=lambda step, total: events["progress"].append((step, total)))
    return run, events, work_dir


def test_time_left_is_counted_from_the_first_progress_report():
    clock = process.TimeLeft()
    assert clock.text(1, 11, now=100.0) == ""  # the first report comes after loading: no rate yet
    assert clock.text(3, 11, now=110.0) == "about 40 s left"  # 2 steps in 10 s, 8 to go
    assert clock.text(6, 11, now=125.0) == "about 25 s left"
    assert process.TimeLeft().text(0, 1000, now=0.0) == ""
    slow = process.TimeLeft()
    slow.text(0, 1000, now=0.0)
    assert slow.text(10, 1000, now=60.0) == "about 99 min left"  # 6 s a step, 990 to go
    assert slow.text(10, 1000, now=60.0) == "about 99 min left"


def test_runner_reports_progress_and_log_then_imports(tmp_path):
    command = script(tmp_path, """
        import sys
        print("loading model")
        for step in range(1, 4):
            print(f"MEDDIFFFM_PROGRESS {step} 3")
        print("warning on stderr", file=sys.stderr)
        """)
    run, events, work_dir = make_run(command, tmp_path)
    assert run.start().wait() == "imported"
    assert events["progress"] == [(1, 3), (2, 3), (3, 3)]
    assert events["log"] == ["loading model", "warning on stderr"]
    assert events["imported"] == 1
    assert not work_dir.exists()


def test_runner_failure_raises_cli_message_and_imports_nothing(tmp_path):
    command = script(tmp_path, """
        import sys
        print("MEDDIFFFM_PROGRESS 1 10")
        print("error: the mask is empty; paint the region first", file=sys.stderr)
        sys.exit(2)
        """)
    run, events, work_dir = make_run(command, tmp_path)
    with pytest.raises(process.TaskFailed, match="^the mask is empty; paint the region first$") as failure:
        run.start().wait()
    assert failure.value.returnCode == 2
    assert events["imported"] == 0
    assert not work_dir.exists()


def test_refused_command_line_options_show_argparse_message_not_usage():
    usage = ["usage: python -m MedDiffFMLib denoise [-h] [--model MODEL] INPUT -o OUTPUT", "  [--nfe NFE]",
             "python -m MedDiffFMLib denoise: error: argument --nfe: must be at least 1, got 0"]
    assert process.errorMessageFromOutput(usage, 2) == ("argument --nfe: must be at least 1, got 0\n"
                                                        "(In Slicer: --nfe is NFE in the panel, nfe in the console.)")
    # A log line mentioning an error is not mistaken for the job's own message.
    other = ["INFO stored error: none", "Traceback (most recent call last):", "ValueError: boom"]
    assert process.errorMessageFromOutput(other, 1).startswith("MedDiffFMLib exited with code 1:")
    # A job killed by a signal prints nothing of its own; SIGKILL is most often the system out of memory.
    assert process.errorMessageFromOutput([], -9).startswith("MedDiffFMLib was killed by signal 9 (SIGKILL: often "
                                                             "the system running out of memory")
    # A Windows process that crashes ends with a status code, which is known by its hexadecimal form.
    assert process.errorMessageFromOutput([], 3221225477) == (
        "MedDiffFMLib ended with status 0xC0000005 (an access violation: a crash inside a compiled library) and "
        "printed nothing.")
    assert process.errorMessageFromOutput(["INFO loading"], 0xC0000017).startswith(
        "MedDiffFMLib ended with status 0xC0000017 (out of memory; try a smaller window batch")
    unknown = process.errorMessageFromOutput([], 0xC0000142)
    assert unknown == "MedDiffFMLib ended with status 0xC0000142 and printed nothing."


def test_command_line_advice_gets_the_slicer_names_of_its_options():
    """The job's messages suggest command line options; a Slicer user sets them in the panel or the console."""
    message = "error: cannot estimate the noise level; give it yourself (e.g. --noise-level 20)"
    assert process.errorMessageFromOutput([message], 1) == (
        "cannot estimate the noise level; give it yourself (e.g. --noise-level 20)\n"
        "(In Slicer: --noise-level is Noise level in the panel, noiseLevel in the console.)")
    # Whole option names only: --window-size and --window-batch do not also count as --window.
    message = "error: out of memory; try a smaller window (--window-size) or window batch (--window-batch 1)"
    assert process.errorMessageFromOutput([message], 1).endswith(
        "(In Slicer: --window-size is Window size in the panel, windowSize in the console; "
        "--window-batch is Window batch in the panel, windowBatch in the console.)")
    assert process.errorMessageFromOutput(["error: the mask is empty"], 1) == "the mask is empty"


def test_waiting_from_the_console_keeps_the_application_handling_events(tmp_path, monkeypatch):
    """A console call blocks until its job ends; Slicer's event loop must keep running meanwhile."""
    handled = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: handled.append(1)), raising=False)
    command = script(tmp_path, """
        import time
        time.sleep(0.5)
        print("MEDDIFFFM_PROGRESS 1 1")
        """)
    run, events, _ = make_run(command, tmp_path)
    assert run.start().wait(pollInterval=0.02) == "imported"
    assert len(handled) >= 5 and events["progress"] == [(1, 1)]
    # ... but not while the panel cancels its job during a scene close.
    handled.clear()
    run, _, _ = make_run(command, tmp_path)
    assert run.start().wait(pollInterval=0.02, handleEvents=False) == "imported" and handled == []


def test_kill_falls_back_to_the_job_itself_when_its_group_cannot_be_signalled(tmp_path, monkeypatch):
    def refuse(pid, sig):
        raise PermissionError("not allowed")

    monkeypatch.setattr(os, "killpg", refuse)
    command = script(tmp_path, """
        import time
        time.sleep(60)
        """)
    run, _, _ = make_run(command, tmp_path)
    run.start()
    started = time.monotonic()
    run.cancel()
    with pytest.raises(process.TaskCancelled):
        run.wait()
    assert time.monotonic() - started < 10


def test_cancel_kills_the_process_tree_and_leaves_no_output(tmp_path):
    psutil = pytest.importorskip("psutil")
    output = tmp_path / "output.nrrd"
    command = script(tmp_path, f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("child", child.pid)
        print("MEDDIFFFM_PROGRESS 1 100")
        time.sleep(60)
        open({str(output)!r}, "w").write("finished")
        """)
    run, events, work_dir = make_run(command, tmp_path)
    run.start()
    started = time.monotonic()
    while not events["progress"]:
        assert not run.poll(), "the job ended before it could be cancelled"
        assert time.monotonic() - started < 30
        time.sleep(0.05)
    grandchild = int(events["log"][0].split()[1])
    run.cancel()
    with pytest.raises(process.TaskCancelled):
        run.wait()
    assert time.monotonic() - started < 30
    assert events["imported"] == 0
    assert not output.exists()
    assert not work_dir.exists()
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_cancel_finishes_the_job_at_once_and_removes_its_folder(tmp_path):
    """A console job started with wait=False may never be polled again: cancel() alone must clean up, also for a
    job whose process has ended but whose results were not imported yet."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run, events, work_dir = make_run(script(tmp_path / "a", "import time\ntime.sleep(60)\n"), tmp_path / "a")
    run.start().cancel()
    assert run.finished and isinstance(run.error, process.TaskCancelled) and not work_dir.exists()
    ended, events, work_dir = make_run(script(tmp_path / "b", "print('done')\n"), tmp_path / "b")
    ended.start()._process.wait()
    ended.cancel()
    assert ended.finished and isinstance(ended.error, process.TaskCancelled)
    assert events["imported"] == 0 and not work_dir.exists()
    with pytest.raises(process.TaskCancelled):
        ended.wait()
    # A job cancelled before it started never runs, and waiting for it returns at once.
    (tmp_path / "c").mkdir()
    never, events, work_dir = make_run(script(tmp_path / "c", "print('ran')\n"), tmp_path / "c")
    never.cancel()
    assert never.finished and not work_dir.exists() and never.start() is never and never._process is None
    with pytest.raises(process.TaskCancelled):
        never.wait()


@pytest.mark.parametrize("failure", [NameError, KeyboardInterrupt])
def test_an_exception_while_waiting_cancels_the_job(tmp_path, failure):
    """A broken progress callback (or Ctrl-C in the console) must not leave the job running unwatched."""
    run, events, work_dir = make_run(script(tmp_path, """
        import time
        print("MEDDIFFFM_PROGRESS 1 100")
        time.sleep(60)
        """), tmp_path)

    def broken(step, total):
        raise failure("totl")
    run.progressCallback = broken
    started = time.monotonic()
    with pytest.raises(failure):
        run.start().wait(pollInterval=0.02)
    assert time.monotonic() - started < 30
    assert not run.running and run.finished and events["imported"] == 0 and not work_dir.exists()


# --- the module file and its Logic ------------------------------------------------------------------


def test_module_imports_without_the_application():
    assert MedDiffFM.qt is None  # slicer-core: the GUI parts are inert, the Logic is complete
    logic = MedDiffFM.MedDiffFMLogic()
    assert callable(logic.denoise) and callable(logic.inpaint)
    assert library.libraryRoot() == str(REPO)


def test_module_needs_at_most_python_3_9():  # Slicer 5.6 embeds Python 3.9
    from test_python39_compat import run_vermin

    done = run_vermin(REPO / "MedDiffFM")
    assert done.returncode == 0, f"Python > 3.9 features in the Slicer module:\n{done.stdout}\n{done.stderr}"


def test_sampling_options_map_to_cli_flags():
    arguments = logic_module.MedDiffFMTasks.samplingArguments(model="tiny", nfe=8, seed=3, forceCpu=True)
    assert [str(a) for a in arguments] == ["--device", "cpu", "--seed", "3", "--model", "tiny", "--nfe", "8"]
    # None means the command line's default, for the seed as for every option
    assert "--seed" not in logic_module.MedDiffFMTasks.samplingArguments(seed=None)
    # no model named: each command uses its own default (fine-tuned tasks have their own model)
    assert "--model" not in logic_module.MedDiffFMTasks.samplingArguments()
    assert logic_module.MedDiffFMTasks.samplingArguments(compileNetwork=True)[-1] == "--compile"
    assert logic_module.MedDiffFMTasks.samplingArguments(threads=3)[-2:] == ["--threads", 3]
    assert logic_module.MedDiffFMTasks.samplingArguments(windowSize=48)[-2:] == ["--window-size", 48]
    assert logic_module.MedDiffFMTasks.samplingArguments(region="chest", overlap=0.25, windowBatch=8)[-6:] == [
        "--region", "chest", "--overlap", 0.25, "--window-batch", 8]
    with pytest.raises(ValueError, match="windowSize must be a whole number"):
        logic_module.MedDiffFMTasks.samplingArguments(windowSize=0)
    assert logic_module.MedDiffFMTasks.samplingArguments(nfe=np.int64(4))[-2:] == ["--nfe", 4]
    with pytest.raises(TypeError):
        logic_module.MedDiffFMTasks.samplingArguments(noise=1)


# A stand-in for `python -m MedDiffFMLib`: records its arguments and writes results with known
# contents on the input's grid (super-resolve: twice as many slices at half the spacing).
FAKE_CLI = """
import argparse, json, os, sys
import numpy as np
import SimpleITK as sitk

parser = argparse.ArgumentParser()
parser.add_argument("task")
parser.add_argument("input", nargs="?")
parser.add_argument("-o", dest="output")
parser.add_argument("--mask")
parser.add_argument("--mask-output")
parser.add_argument("--reference")
parser.add_argument("--size", type=int, nargs=3)
parser.add_argument("--spacing", type=float, nargs=3)
args, _ = parser.parse_known_args()
json.dump(sys.argv[1:], open(os.path.join(os.path.dirname(__file__), "..", "argv.json"), "w"))
open(os.path.join(os.path.dirname(__file__), "..", "tmpdir.txt"), "w").write(os.environ["MEDDIFFFM_TEMPORARY_ROOT"])
print("MEDDIFFFM_PROGRESS 1 1")
if args.size:
    image = sitk.Image(args.size, sitk.sitkFloat32)
    image.SetSpacing(args.spacing)
else:
    image = sitk.ReadImage(args.input or args.reference)
array = sitk.GetArrayFromImage(image).astype(np.float32)
if args.task == "super-resolve":
    out = sitk.GetImageFromArray(np.repeat(array, 2, axis=0))
    out.SetSpacing(image.GetSpacing()[:2] + (image.GetSpacing()[2] / 2,))
    out.SetOrigin(image.GetOrigin())
    out.SetDirection(image.GetDirection())
elif args.task == "detect-anomalies":
    score = (array > 100).astype(np.float32)
    out = sitk.GetImageFromArray(score)
    out.CopyInformation(image)
    mask = sitk.GetImageFromArray((score > 0.5).astype(np.uint8))
    mask.CopyInformation(image)
    sitk.WriteImage(mask, args.mask_output)
else:
    if args.mask:
        array[sitk.GetArrayFromImage(sitk.ReadImage(args.mask)) > 0] = -1000
    out = sitk.GetImageFromArray(array + 1)
    out.CopyInformation(image)
sitk.WriteImage(out, args.output)
"""


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    install_fake_library(tmp_path, monkeypatch, FAKE_CLI)
    return lambda: json.loads((tmp_path / "lib" / "argv.json").read_text())


def install_fake_library(tmp_path, monkeypatch, main_source):
    """A `MedDiffFMLib` package under tmp_path/lib whose `python -m` runs `main_source`, found by the module."""
    package = tmp_path / "lib" / "MedDiffFMLib"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(main_source)
    monkeypatch.setattr(library, "libraryRoot", lambda: str(tmp_path / "lib"))


def test_one_job_at_a_time_from_panel_and_console(ct_node, tmp_path, monkeypatch):
    """A second job, from another logic instance (the panel's and the console's differ), is refused while the
    first runs, and leaves nothing behind; once the first is cancelled the next one starts."""
    install_fake_library(tmp_path, monkeypatch, "import time\ntime.sleep(60)\n")
    monkeypatch.setattr(logic_module.MedDiffFMTasks, "_temporaryRoot", staticmethod(lambda: str(tmp_path)))
    panel, console = logic_module.MedDiffFMTasks(), logic_module.MedDiffFMTasks()
    first = panel.denoise(ct_node, wait=False)
    nodes, folders = slicer.mrmlScene.GetNumberOfNodes(), sorted(tmp_path.iterdir())
    with pytest.raises(RuntimeError, match="Another MedDiffFM job is still running"):
        console.denoise(ct_node)
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes and sorted(tmp_path.iterdir()) == folders
    assert logic_module.MedDiffFMTasks.activeJob() is first
    first.cancel()  # returns once the job is gone: the next one starts at once, before any wait() or poll()
    second = console.denoise(ct_node, wait=False)
    assert second.running and logic_module.MedDiffFMTasks.activeJob() is second
    with pytest.raises(process.TaskCancelled):
        first.wait(handleEvents=False)
    assert logic_module.MedDiffFMTasks.cancelActiveJob() and not second.running
    with pytest.raises(process.TaskCancelled):
        second.wait(handleEvents=False)
    assert logic_module.MedDiffFMTasks.activeJob() is None and not logic_module.MedDiffFMTasks.cancelActiveJob()
    # Closing the scene cancels a console job too (the panel was never opened here).
    third = console.denoise(ct_node, wait=False)
    slicer.mrmlScene.Clear(0)
    assert not third.running and logic_module.MedDiffFMTasks.activeJob() is None
    with pytest.raises(process.TaskCancelled):
        third.wait(handleEvents=False)
    assert not list(tmp_path.glob("MedDiffFM-*"))  # the jobs' folders, with the exported CT, are gone


def test_a_new_job_removes_the_folders_of_jobs_whose_slicer_was_killed(ct_node, fake_cli, tmp_path, monkeypatch):
    """A Slicer killed mid-job leaves its job folder (an exported CT) behind; the next job removes it, but not the
    folder of a live process's job (another Slicer's) nor one without an owner file."""
    monkeypatch.setattr(logic_module.MedDiffFMTasks, "_temporaryRoot", staticmethod(lambda: str(tmp_path / "tmp")))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folders = {}
    for name, owner in (("killed", gone.pid), ("live", os.getppid()), ("unowned", None)):
        folders[name] = tmp_path / "tmp" / f"MedDiffFM-{name}"
        folders[name].mkdir(parents=True)
        (folders[name] / "input.nrrd").write_bytes(b"CT")
        if owner is not None:
            (folders[name] / logic_module.JOB_OWNER_FILE).write_text(str(owner))
    MedDiffFM.MedDiffFMLogic().denoise(ct_node)
    assert not folders["killed"].exists() and folders["live"].exists() and folders["unowned"].exists()
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == ["MedDiffFM-live", "MedDiffFM-unowned"]


def test_closing_the_scene_drops_a_finished_job_not_yet_imported(ct_node, fake_cli, tmp_path, monkeypatch):
    """A console job whose process has ended but whose results wait for poll() must not land in the next scene."""
    monkeypatch.setattr(logic_module.MedDiffFMTasks, "_temporaryRoot", staticmethod(lambda: str(tmp_path / "tmp")))
    (tmp_path / "tmp").mkdir()
    logic = MedDiffFM.MedDiffFMLogic()
    run = logic.denoise(ct_node, wait=False)
    run._process.wait()
    later = logic.denoise(ct_node, wait=False)  # the first has ended, so another may start: both are unfinished
    later._process.wait()
    slicer.mrmlScene.Clear(0)
    for job in (run, later):
        with pytest.raises(process.TaskCancelled):
            job.wait(handleEvents=False)
    assert slicer.mrmlScene.GetFirstNodeByName("CT denoised") is None and not any((tmp_path / "tmp").iterdir())


def test_logic_denoise_makes_new_node_on_input_grid(ct_node, fake_cli, tmp_path):
    before = slicer.util.arrayFromVolume(ct_node).copy()
    logic = MedDiffFM.MedDiffFMLogic()
    progress = []
    logic.progressCallback = lambda step, total: progress.append((step, total))
    node = logic.denoise(ct_node, noiseLevel=25, nfe=5, seed=7, model="tiny", region="abdomen")

    argv = fake_cli()
    assert argv[0] == "denoise" and argv[1].endswith("input.nrrd") and argv[2:4] == ["-o", argv[3]]
    for flag, value in [("--noise-level", "25"), ("--nfe", "5"), ("--seed", "7"), ("--model", "tiny"),
                        ("--device", "auto"), ("--region", "abdomen"), ("--progress", "machine")]:
        assert argv[argv.index(flag) + 1] == value
    assert progress == [(1, 1)]
    assert node.GetName() == "CT denoised" and node is not ct_node
    np.testing.assert_allclose(volumes.ijkToRASArray(node), volumes.ijkToRASArray(ct_node), atol=1e-5)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before + 1)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct_node), before)
    assert not os.path.exists(os.path.dirname(argv[1]))  # temporary folder removed
    # TotalSegmentator's copies of the CT go into the job's folder (anatomy.TEMPORARY_ROOT_ENV).
    assert (tmp_path / "lib" / "tmpdir.txt").read_text() == os.path.dirname(argv[1])
    from MedDiffFMLib.anatomy import TEMPORARY_ROOT_ENV
    assert logic_module.MedDiffFMTasks._environment("job")[TEMPORARY_ROOT_ENV] == "job"  # the name the library reads


def _translation(name, shift_mm):
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    matrix = vtk.vtkMatrix4x4()
    for axis, value in enumerate(shift_mm):
        matrix.SetElement(axis, 3, value)
    transform.SetMatrixTransformToParent(matrix)
    return transform


def _world_ijk_to_ras(node):
    """The node's voxel-to-world matrix, its parent transforms applied."""
    toWorld = np.eye(4)
    if node.GetParentTransformNode() is not None:
        matrix = vtk.vtkMatrix4x4()
        node.GetParentTransformNode().GetMatrixTransformToWorld(matrix)
        toWorld = slicer.util.arrayFromVTKMatrix(matrix)
    return toWorld @ volumes.ijkToRASArray(node)


@pytest.mark.parametrize("change", ["harden", "edit origin", "remove", "remove with its transform", "reparent"])
def test_results_land_where_the_input_lay_when_its_input_changed_during_the_job(ct_node, fake_cli, change):
    """A job works on the input's own grid, without its transform. Hardened, its origin edited or removed while the
    job ran, the input no longer tells where that grid lay: the results go where it lay at the start (under the
    transform it had, if that still exists), and the log says so. Moved under another transform, it keeps its grid,
    and the results follow it."""
    start = _translation("registration", (50.0, 0.0, 0.0))
    ct_node.SetAndObserveTransformNodeID(start.GetID())
    expected = _world_ijk_to_ras(ct_node)
    logic = MedDiffFM.MedDiffFMLogic()
    messages = []
    logic.logCallback = messages.append
    run = logic.detectAnomalies(ct_node, wait=False)
    if change == "harden":
        ct_node.HardenTransform()
    elif change == "edit origin":
        ct_node.SetOrigin(0.0, 0.0, 0.0)
    elif change.startswith("remove"):
        slicer.mrmlScene.RemoveNode(ct_node)
        if change == "remove with its transform":
            slicer.mrmlScene.RemoveNode(start)
            expected = volumes.ijkToRASArray(ct_node)  # nothing can say where the transform put it
    else:
        ct_node.SetAndObserveTransformNodeID(_translation("moved", (0.0, -20.0, 0.0)).GetID())
        expected = _world_ijk_to_ras(ct_node)
    mapNode, segmentation = run.wait(handleEvents=False)
    np.testing.assert_allclose(_world_ijk_to_ras(mapNode), expected, atol=1e-5)
    assert segmentation.GetTransformNodeID() == mapNode.GetTransformNodeID()
    notes = [m for m in messages if "while the job ran" in m]
    if change == "reparent":
        assert mapNode.GetTransformNodeID() == ct_node.GetTransformNodeID() and not notes
    elif change == "remove with its transform":
        assert mapNode.GetTransformNodeID() is None and "deleted since" in notes[0]
    else:
        assert mapNode.GetTransformNodeID() == start.GetID() and "under its transform 'registration'" in notes[0]


def test_logic_denoise_window_reaches_the_cli_as_numbers(ct_node, fake_cli):
    """Python prints -1e-05 in scientific notation, which argparse's own pattern takes for an option."""
    from MedDiffFMLib.cli import build_parser

    MedDiffFM.MedDiffFMLogic().denoise(ct_node, window=(-1e-5, 2e2))
    arguments = build_parser().parse_args(fake_cli())
    assert arguments.window == [-1e-5, 200.0]


def test_logic_inpaint_sends_the_segment_as_mask(ct_node, fake_cli):
    segmentation, segment_id, sphere = sphere_segmentation(ct_node, center_ijk=(8, 24, 24), radius_vox=5)
    before = slicer.util.arrayFromVolume(ct_node).copy()
    node = MedDiffFM.MedDiffFMLogic().inpaint(ct_node, segmentation, segment_id, nfe=3)

    result = slicer.util.arrayFromVolume(node)
    assert node.GetName() == "CT inpainted"
    np.testing.assert_array_equal(result[sphere > 0], -999)
    np.testing.assert_array_equal(result[sphere == 0], before[sphere == 0] + 1)


def test_logic_synthesize_on_a_reference_grid_or_a_given_grid(ct_node, fake_cli):
    logic = MedDiffFM.MedDiffFMLogic()
    on_reference = logic.synthesize(ct_node, seed=2)
    argv = fake_cli()
    assert argv[:2] == ["synthesize", "-o"] and argv[argv.index("--reference") + 1].endswith("reference.nrrd")
    assert on_reference.GetName() == "CT synthesized"
    np.testing.assert_allclose(volumes.ijkToRASArray(on_reference), volumes.ijkToRASArray(ct_node), atol=1e-5)

    on_size = logic.synthesize(size=(20, 30, 10), spacing=(0.5, 0.5, 2.0), region="chest")
    argv = fake_cli()
    assert argv[argv.index("--size") + 1:argv.index("--size") + 4] == ["20", "30", "10"]
    assert argv[argv.index("--region") + 1] == "chest"
    assert slicer.util.arrayFromVolume(on_size).shape == (10, 30, 20)
    np.testing.assert_allclose(volumes.ijkToRASArray(on_size)[:3, :3], np.diag([-0.5, -0.5, 2.0]))  # LPS -> RAS
    with pytest.raises(ValueError, match="reference volume, or both size"):
        logic.synthesize(size=(20, 30, 10))


def test_logic_generate_lesion_names_its_result(ct_node, fake_cli):
    segmentation, segment_id, _ = sphere_segmentation(ct_node, center_ijk=(8, 24, 24), radius_vox=4)
    node = MedDiffFM.MedDiffFMLogic().generateLesion(ct_node, segmentation, segment_id)
    argv = fake_cli()
    assert node.GetName() == "CT with lesion" and "--mask" in argv and "--model" not in argv


def test_logic_detect_anomalies_gives_colour_map_and_segmentation(ct_node, fake_cli):
    nodes_before = scene_nodes()
    map_node, segmentation = MedDiffFM.MedDiffFMLogic().detectAnomalies(ct_node, threshold=0.5)
    assert scene_nodes() - nodes_before == {map_node.GetID(), map_node.GetDisplayNodeID(),
                                            segmentation.GetID(), segmentation.GetDisplayNodeID()}

    argv = fake_cli()
    assert argv[argv.index("--threshold") + 1] == "0.5" and "--mask-output" in argv
    assert map_node.GetName() == "CT anomaly map" and segmentation.GetName() == "CT anomalies"
    assert map_node.GetDisplayNode().GetColorNode().GetName() == "PET-Heat"
    expected = slicer.util.arrayFromVolume(ct_node) > 100
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(map_node), expected.astype(np.float32))
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, ct_node)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(labelmap) > 0, expected)


@pytest.mark.parametrize("failing", ["addSegmentationNodeFromMaskFile", "copyWindowLevel"])
def test_a_result_that_fails_to_import_leaves_none_of_its_nodes(ct_node, fake_cli, monkeypatch, failing):
    """The anomaly map without its segmentation, or a denoised CT whose display failed, is no result: the scene is
    left as it was, display nodes included."""
    def broken(*args, **kwargs):
        raise RuntimeError("import failed")

    monkeypatch.setattr(volumes, failing, broken)
    nodes_before = scene_nodes()
    logic = MedDiffFM.MedDiffFMLogic()
    with pytest.raises(RuntimeError, match="import failed"):
        logic.detectAnomalies(ct_node) if failing == "addSegmentationNodeFromMaskFile" else logic.denoise(ct_node)
    assert scene_nodes() == nodes_before


def test_a_model_file_given_from_the_console_is_found_where_the_user_is(tmp_path, monkeypatch):
    """Jobs run in the library's folder, without a shell: a relative path or ~ is resolved before it is passed on,
    and a registered name is passed as it is."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    sampling = logic_module.MedDiffFMTasks.samplingArguments
    for given, passed in (("models/mine.safetensors", tmp_path / "models" / "mine.safetensors"),
                          ("mine.json", tmp_path / "mine.json"),
                          ("~/mine.safetensors", tmp_path / "home" / "mine.safetensors"),
                          (tmp_path / "abs.safetensors", tmp_path / "abs.safetensors"),
                          ("tiny", "tiny")):
        arguments = sampling(model=given)
        assert arguments[arguments.index("--model") + 1] == str(passed)


def test_logic_super_resolve_takes_the_new_grid_from_the_result(ct_node, fake_cli):
    node = MedDiffFM.MedDiffFMLogic().superResolve(ct_node, factor=2)
    argv = fake_cli()
    assert argv[argv.index("--factor") + 1] == "2"
    matrix, input_matrix = volumes.ijkToRASArray(node), volumes.ijkToRASArray(ct_node)
    np.testing.assert_allclose(matrix[:, :2], input_matrix[:, :2], atol=1e-5)
    np.testing.assert_allclose(matrix[:3, 2], input_matrix[:3, 2] / 2, atol=1e-5)  # half the slice spacing
    np.testing.assert_allclose(matrix[:3, 3], input_matrix[:3, 3], atol=1e-4)
    assert slicer.util.arrayFromVolume(node).shape[0] == 2 * slicer.util.arrayFromVolume(ct_node).shape[0]


def test_logic_failure_leaves_the_scene_unchanged(ct_node, fake_cli, tmp_path):
    (tmp_path / "lib" / "MedDiffFMLib" / "__main__.py").write_text(
        "import sys\nprint('error: model \\'nope\\' is not in Resources/Models.json', file=sys.stderr)\nsys.exit(2)\n")
    nodes_before = scene_nodes()
    with pytest.raises(process.TaskFailed, match="model 'nope' is not in Resources/Models.json"):
        MedDiffFM.MedDiffFMLogic().denoise(ct_node, model="nope")
    assert scene_nodes() == nodes_before


def test_console_calls_without_proper_nodes_get_clear_messages(ct_node, fake_cli):
    logic = MedDiffFM.MedDiffFMLogic()
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lesion labels")
    nodes_before = scene_nodes()
    with pytest.raises(ValueError, match="Denoise needs an input volume"):
        logic.denoise(None)
    with pytest.raises(ValueError, match="Inpaint needs a segmentation node and a segment ID, got nothing"):
        logic.inpaint(ct_node, None, None)
    with pytest.raises(ValueError, match="'lesion labels' \\(vtkMRMLLabelMapVolumeNode\\)"):
        logic.generateLesion(ct_node, labelmap, "1")
    # An optional segment given without its segmentation is refused, not dropped (the whole CT would run).
    for task in (logic.denoise, logic.detectAnomalies):
        with pytest.raises(ValueError, match="segmentId 'Segment_1' was given without its segmentationNode"):
            task(ct_node, segmentId="Segment_1")
    # ... and a segmentation without its segment too.
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "lesions")
    for task in (logic.denoise, logic.detectAnomalies):
        with pytest.raises(ValueError, match=r"A segmentation, 'lesions' \(vtkMRMLSegmentationNode\), was given without segmentId"):
            task(ct_node, segmentationNode=segmentation)
    # Sampling options are checked under their own names, before anything starts.
    for option, value in (("nfe", 0), ("windowBatch", 0), ("threads", 0), ("seed", -1), ("nfe", 2.5)):
        with pytest.raises(ValueError, match=f"{option} must be a whole number of at least"):
            logic.denoise(ct_node, **{option: value})
    # Task settings too, in the console's terms (before: argparse's words from the job, or a wrong result).
    for call, message in (
            (lambda: logic.denoise(ct_node, window="chest"), r"window must be two numbers \(low, high\)"),
            (lambda: logic.denoise(ct_node, window=(240, -160)), "with low < high"),
            (lambda: logic.denoise(ct_node, noiseLevel=0), "noiseLevel must be a number above 0"),
            (lambda: logic.detectAnomalies(ct_node, threshold=0), "threshold must be a number above 0"),
            (lambda: logic.superResolve(ct_node, factor=2.5), "factor must be a whole number of at least 2"),
            (lambda: logic.inpaint(ct_node, segmentation, "1", resample=0), "resample must be a whole number"),
            (lambda: logic.inpaint(ct_node, segmentation, None), r"Inpaint needs a segment ID \(or name\): the "
                                                                  "segment of 'lesions'"),
            (lambda: logic.synthesize(size=[16.0, 16, 16], spacing=[1, 1, 1], region="chest"),
             "each size value must be a whole number"),
            (lambda: logic.synthesize(size=[16, 16], spacing=[1, 1, 1]), r"size must be three values \(x, y, z\)"),
            (lambda: logic.synthesize(size=[16, 16, 16], spacing=[1, 0, 1]), "each spacing value must be a number "
                                                                             "above 0"),
            (lambda: logic.synthesize(ct_node, size=[16, 16, 16], spacing=[1, 1, 1]), "not both"),
            (lambda: logic.synthesize(ct_node, size=[16, 16, 16]), "not both"),
            (lambda: logic.synthesize(size=[16, 16, 16]), "or both size .* and spacing")):
        with pytest.raises(ValueError, match=message):
            call()
    with pytest.raises(ValueError, match="not a CT volume node"):
        logic.denoise(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLModelNode", "surface"))
    with pytest.raises(ValueError, match=r"'lesion labels' \(vtkMRMLLabelMapVolumeNode\) is not a CT volume node"):
        logic.synthesize(labelmap)
    with pytest.raises(ValueError, match=r"'lesions' \(vtkMRMLSegmentationNode\) is not a CT volume node"):
        logic.synthesize(segmentation)
    # Names typed in place of nodes: every task says so before reading anything from them.
    with pytest.raises(ValueError, match=r"'CT' \(a str; pass the node, e.g. slicer.util.getNode\(name\)\) is not a CT"):
        logic.detectAnomalies("CT")
    with pytest.raises(ValueError, match=r"Inpaint needs a segmentation node and a segment ID, got 'lesions' \(a str;"):
        logic.inpaint(ct_node, "lesions", "1")
    with pytest.raises(ValueError, match=r"A segmentation, 'lesions' \(a str; .*\), was given without segmentId"):
        logic.denoise(ct_node, segmentationNode="lesions")
    assert scene_nodes() - nodes_before == {segmentation.GetID(), slicer.mrmlScene.GetFirstNodeByName("surface").GetID()}


@pytest.mark.parametrize("kind", ["vtkMRMLVectorVolumeNode", "vtkMRMLDiffusionWeightedVolumeNode",
                                  "vtkMRMLDiffusionTensorVolumeNode"])
def test_volumes_of_the_scalar_class_that_are_never_a_ct_are_refused(scene, fake_cli, kind):
    """They derive from the scalar volume class (a tensor volume's export was a traceback: it has no scalars)."""
    node = slicer.mrmlScene.AddNewNodeByClass(kind, "RGB")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 8)
    image.AllocateScalars(vtk.VTK_FLOAT, 3)
    node.SetAndObserveImageData(image)
    with pytest.raises(ValueError, match=rf"'RGB' \({kind}\) is not a CT volume node"):
        MedDiffFM.MedDiffFMLogic().denoise(node)


def test_repeated_runs_get_distinct_names(ct_node, fake_cli):
    logic = MedDiffFM.MedDiffFMLogic()
    names = [logic.denoise(ct_node).GetName() for _ in range(3)]
    assert names == ["CT denoised", "CT denoised_1", "CT denoised_2"]
    first, second = (logic.detectAnomalies(ct_node) for _ in range(2))
    assert [node.GetName() for node in first + second] == [
        "CT anomaly map", "CT anomalies", "CT anomaly map_1", "CT anomalies_1"]


def test_results_join_their_input_in_the_subject_hierarchy(ct_node, fake_cli, tmp_path):
    """A CT loaded from DICOM sits in its patient's study: its results belong there too, not at the scene's top."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
    study = hierarchy.CreateStudyItem(patient, "Study")
    hierarchy.CreateItem(study, ct_node)
    logic = MedDiffFM.MedDiffFMLogic()
    results = [logic.denoise(ct_node), *logic.detectAnomalies(ct_node)]
    assert [hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) for node in results] == [study] * 3
    # In the application every new node gets an item at the scene's top at once: a result's item is moved.
    def item_at_the_top(scene, event, node):
        if node.IsA("vtkMRMLVolumeNode") and not hierarchy.GetItemByDataNode(node):
            hierarchy.CreateItem(hierarchy.GetSceneItemID(), node)

    item_at_the_top = vtk.calldata_type(vtk.VTK_OBJECT)(item_at_the_top)
    observer = slicer.mrmlScene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, item_at_the_top)
    try:
        moved = logic.denoise(ct_node)
    finally:
        slicer.mrmlScene.RemoveObserver(observer)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(moved)) == study
    # A synthetic CT is no scan of the reference's patient: it stays out of the study.
    synthetic = logic.synthesize(ct_node)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(synthetic)) != study
    # The copy a segment is exported from leaves no item behind.
    items = hierarchy.GetNumberOfItems()
    segmentation, segment_id, _ = sphere_segmentation(ct_node, center_ijk=(8, 20, 26), radius_vox=6)
    hierarchy.CreateItem(study, segmentation)
    volumes.writeSegmentMask(segmentation, segment_id, ct_node, tmp_path / "m.nrrd")
    assert hierarchy.GetNumberOfItems() == items + 1


def test_a_ct_result_is_shown_like_its_input(ct_node, fake_cli):
    ct_node.CreateDefaultDisplayNodes()
    display = ct_node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(400, 40)
    result = MedDiffFM.MedDiffFMLogic().denoise(ct_node).GetDisplayNode()
    assert not result.GetAutoWindowLevel() and (result.GetWindow(), result.GetLevel()) == (400, 40)
    assert result.GetColorNodeID() == display.GetColorNodeID()
    display.SetAutoWindowLevel(True)  # an automatic input leaves the result automatic too
    assert MedDiffFM.MedDiffFMLogic().denoise(ct_node).GetDisplayNode().GetAutoWindowLevel()


def test_detect_anomalies_refuses_nfe(ct_node):
    with pytest.raises(ValueError, match="no NFE"):
        MedDiffFM.MedDiffFMLogic().detectAnomalies(ct_node, nfe=10)


@pytest.mark.parametrize("fields, expected", [
    (dict(windowSize=0, overlap=0.0, windowBatch=0, nfe=0, noiseLevel=0.0),
     dict(windowSize=None, overlap=None, windowBatch=None, nfe=None, noiseLevel=None)),
    (dict(windowSize=0, overlap=0.0, windowBatch=0, nfe=0, noiseLevel=-1.0), dict(noiseLevel=None)),
    (dict(windowSize=48, overlap=0.17, windowBatch=64, nfe=20, noiseLevel=12.5),
     dict(windowSize=48, overlap=0.17, windowBatch=64, nfe=20, noiseLevel=12.5)),
])
def test_panel_maps_its_automatic_values_to_the_commands_defaults(fields, expected):
    """The panel's 0 / 'automatic' values reach the logic as None (the command's own default), others as set.
    A noise level of 0 ('auto' in its spin box) or -1 (scenes saved before) is estimated; 0 HU is not a level."""
    calls = []
    panel = types.SimpleNamespace(
        _parameterNode=types.SimpleNamespace(
            model="", seed=3, forceCpu=True, region="auto", task="denoise", inputVolume="CT",
            maskSegmentation=None, maskSegmentId="", **fields),
        logic=types.SimpleNamespace(denoise=lambda volume, **options: calls.append((volume, options)) or "job"),
        addLog=lambda text: None)
    assert MedDiffFM.MedDiffFMWidget._startRun(panel) == "job"
    (volume, options), = calls
    assert volume == "CT" and options["seed"] == 3 and options["region"] is None
    assert {key: options[key] for key in expected} == expected
    logic_module.MedDiffFMTasks.samplingArguments(**{key: value for key, value in options.items()
                                                     if key in ("model", "nfe", "seed", "forceCpu", "overlap",
                                                                "windowBatch", "region", "windowSize")})


def test_panel_widgets_and_parameter_node_agree():
    """Without Qt the panel cannot be shown, but its wiring can be checked: every `self.ui.<name>` the
    widget uses exists in the .ui file, and the .ui binds every parameter-node field not bound by hand."""
    module_source = (REPO / "MedDiffFM" / "MedDiffFM.py").read_text()
    ui_source = (REPO / "MedDiffFM" / "Resources" / "UI" / "MedDiffFM.ui").read_text()
    ui_names = set(re.findall(r'<widget class="[^"]+" name="([^"]+)"', ui_source))
    used = set(re.findall(r"self\.ui\.(\w+)", module_source))
    assert used <= ui_names, f"widgets missing from the .ui file: {used - ui_names}"

    bound = set(re.findall(r'<property name="SlicerParameterName" stdset="0">\s*<string>(\w+)</string>', ui_source))
    node_class = next(n for n in ast.walk(ast.parse(module_source))
                      if isinstance(n, ast.ClassDef) and n.name == "MedDiffFMParameterNode")
    fields = {n.target.id for n in node_class.body if isinstance(n, ast.AnnAssign)}
    by_hand = {"maskSegmentation", "maskSegmentId", "model", "task"}  # dynamic choices / segment ids
    assert bound | by_hand == fields


# --- the real command line ---------------------------------------------------------------------------


@pytest.fixture
def small_ct_node(scene, ct_image):
    """A 32 x 32 x 16 crop: each real run starts Python, torch and MONAI, so the volume is kept small."""
    return node_from_image(crop(ct_image, (32, 32, 16)), "CT")


# The registered test model (Resources/Models.json "tiny"): the real path from a model name to nodes.
TINY_MODEL = "tiny"


def test_real_denoise_adds_one_node_on_the_input_grid(small_ct_node):
    ct_node = small_ct_node
    before = slicer.util.arrayFromVolume(ct_node).copy()
    nodes_before = scene_nodes()
    logic = MedDiffFM.MedDiffFMLogic()
    progress = []
    logic.progressCallback = lambda step, total: progress.append((step, total))
    node = logic.denoise(ct_node, nfe=2, seed=0, model=TINY_MODEL, forceCpu=True)

    assert node.GetName() == "CT denoised"
    assert progress[-1] == (2, 2)
    np.testing.assert_allclose(volumes.ijkToRASArray(node), volumes.ijkToRASArray(ct_node), atol=1e-5)
    result = slicer.util.arrayFromVolume(node)
    assert result.shape == before.shape and np.isfinite(result).all()
    assert not np.array_equal(result, before)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct_node), before)
    assert scene_nodes() - nodes_before == {node.GetID(), node.GetDisplayNodeID()}


def test_real_denoise_inside_a_segment_keeps_the_rest(small_ct_node):
    ct_node = small_ct_node
    segmentation, segment_id, sphere = sphere_segmentation(ct_node, center_ijk=(8, 16, 16), radius_vox=6)
    before = slicer.util.arrayFromVolume(ct_node).copy()
    node = MedDiffFM.MedDiffFMLogic().denoise(ct_node, segmentationNode=segmentation, segmentId=segment_id, nfe=2,
                                              seed=0, model=TINY_MODEL, forceCpu=True)
    result = slicer.util.arrayFromVolume(node)
    inside = sphere > 0
    np.testing.assert_array_equal(result[~inside], before[~inside])
    assert not np.array_equal(result[inside], before[inside])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct_node), before)


def test_real_anomaly_segmentation_is_the_thresholded_map(small_ct_node):
    ct_node = small_ct_node
    logic = MedDiffFM.MedDiffFMLogic()
    log = []
    logic.logCallback = log.append
    map_node, segmentation = logic.detectAnomalies(ct_node, model=TINY_MODEL, forceCpu=True)

    summary = json.loads(next(line for line in log if line.startswith("{")))
    anomaly_map = slicer.util.arrayFromVolume(map_node)
    np.testing.assert_allclose(volumes.ijkToRASArray(map_node), volumes.ijkToRASArray(ct_node), atol=1e-5)
    labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segmentation.GetSegmentation().GetNthSegmentID(0))
    slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, labelmap, ct_node)
    segmented = slicer.util.arrayFromVolume(labelmap) > 0
    assert segmented.sum() == summary["anomalous_voxels"] > 0
    assert anomaly_map[segmented].min() >= summary["threshold_hu"] - 1e-3


def test_real_inpaint_changes_only_the_segment(small_ct_node):
    ct_node = small_ct_node
    segmentation, segment_id, sphere = sphere_segmentation(ct_node, center_ijk=(8, 16, 16), radius_vox=5)
    before = slicer.util.arrayFromVolume(ct_node).copy()
    node = MedDiffFM.MedDiffFMLogic().inpaint(ct_node, segmentation, segment_id, resample=1, nfe=3,
                                              model=TINY_MODEL, forceCpu=True)

    assert node.GetName() == "CT inpainted"
    np.testing.assert_allclose(volumes.ijkToRASArray(node), volumes.ijkToRASArray(ct_node), atol=1e-5)
    result = slicer.util.arrayFromVolume(node)
    inside = sphere > 0
    np.testing.assert_array_equal(result[~inside], before[~inside])  # outside the segment: untouched
    assert np.isfinite(result).all() and not np.array_equal(result[inside], before[inside])
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct_node), before)


def test_bad_mask_fails_before_running_and_leaves_nothing(ct_node, fake_cli, tmp_path, monkeypatch):
    temporary = tmp_path / "temporary"
    temporary.mkdir()
    monkeypatch.setattr(logic_module.MedDiffFMTasks, "_temporaryRoot", staticmethod(lambda: str(temporary)))
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    empty_id = segmentation.GetSegmentation().AddEmptySegment("lesion")
    nodes_before = scene_nodes()
    with pytest.raises(ValueError, match="has no voxels inside"):
        MedDiffFM.MedDiffFMLogic().inpaint(ct_node, segmentation, empty_id)
    assert list(temporary.iterdir()) == []
    assert not (tmp_path / "lib" / "argv.json").exists()  # the command never ran
    assert scene_nodes() == nodes_before


def test_models_listed_from_the_bundled_and_the_user_registry(tmp_path, monkeypatch):
    from MedDiffFMLib import registry
    from MedDiffFMLib.errors import CheckpointError

    resources = tmp_path / "Resources"
    monkeypatch.setattr(registry, "RESOURCES", resources)
    monkeypatch.setattr(registry, "BUNDLED_REGISTRY", resources / "Models.json")
    assert library.availableModels() == []  # no Models.json: the panel says "none is registered"
    (resources / "Models").mkdir(parents=True)
    (resources / "Models.json").write_text(json.dumps({"models": [
        {"name": "tiny", "file": "Models/tiny.safetensors", "description": "CPU-trained tiny model"},
        {"name": "tiny-lesion", "file": "Models/tiny-lesion.safetensors", "description": "lesion ControlNet"},
        {"name": "lost", "file": "Models/lost.safetensors", "description": "its files are missing"}]}))
    for name, info in (("tiny", {"format": 1}), ("tiny-lesion", {"kind": "controlnet", "task": "lesion"})):
        (resources / "Models" / f"{name}.json").write_text(json.dumps(info))
        (resources / "Models" / f"{name}.safetensors").write_bytes(b"")
    home = registry.user_registry().parent  # the user's registry, which extension updates leave alone
    (home / "Models").mkdir(parents=True)
    (home / "Models.json").write_text(json.dumps({"models": [
        {"name": "mine-sr", "file": "Models/mine-sr.safetensors", "description": "my super-resolution"}]}))
    (home / "Models" / "mine-sr.json").write_text(json.dumps({"kind": "controlnet", "task": "super-resolution"}))
    (home / "Models" / "mine-sr.safetensors").write_bytes(b"")
    assert library.availableModels() == [("tiny", "CPU-trained tiny model", "base"),
                                         ("tiny-lesion", "lesion ControlNet", "lesion"),
                                         ("lost", "its files are missing", None),
                                         ("mine-sr", "my super-resolution", "super-resolution")]
    (home / "Models.json").write_text("{")  # damaged: the shipped models are still listed
    assert [name for name, _description, _kind in library.availableModels()] == ["tiny", "tiny-lesion", "lost"]
    (resources / "Models.json").write_text("{")
    with pytest.raises(CheckpointError, match=f"the model registry {resources / 'Models.json'} is damaged"):
        library.availableModels()


def test_registered_models_fit_the_tasks_the_panel_offers_them_for():
    """The kinds read from the bundled models' own files: each task's default model fits it."""
    kinds = {name: kind for name, _description, kind in library.availableModels()}
    assert kinds["default"] == "base" and kinds["tiny-lesion"] == "lesion"
    assert kinds["tiny-super-resolution"] == "super-resolution"
    assert MedDiffFM.modelMismatch("tiny-lesion", "lesion", "generate-lesion") == ""
    assert MedDiffFM.modelMismatch("default", "base", "inpaint") == ""  # fills with normal tissue
    assert MedDiffFM.modelMismatch("unknown", None, "denoise") == ""  # the job will say what is wrong
    assert MedDiffFM.modelMismatch("tiny-lesion", "lesion", "denoise") == (
        "Model 'tiny-lesion' is a lesion ControlNet; Denoise runs a base model: choose Task default.")


def test_a_damaged_bundled_registry_leaves_the_panel_open_and_says_why(tmp_path, monkeypatch):
    from MedDiffFMLib import registry

    damaged = tmp_path / "Models.json"
    damaged.write_text('{"models": 1}')
    monkeypatch.setattr(registry, "BUNDLED_REGISTRY", damaged)
    items, logged = [], []
    combo = types.SimpleNamespace(clear=items.clear, addItem=lambda text, data: items.append((text, data)))
    panel = types.SimpleNamespace(ui=types.SimpleNamespace(modelComboBox=combo), addLog=logged.append)
    MedDiffFM.MedDiffFMWidget._populateModels(panel)
    assert items == [("Task default (none is registered)", "")] and not panel._modelsInstalled
    assert len(logged) == 1 and f"the model registry {damaged} is damaged" in logged[0]
    assert "reinstall the extension" in logged[0]


def test_a_model_registered_while_the_panel_is_open_is_listed_when_it_is_shown_again(monkeypatch):
    from MedDiffFMLib import checkpoints

    monkeypatch.setattr(MedDiffFM, "qt", types.SimpleNamespace(Qt=types.SimpleNamespace(ToolTipRole=3)))  # no Qt app
    items, calls = [], []

    class Combo:
        count = property(lambda self: len(items))
        clear = items.clear

        def addItem(self, text, data):
            items.append((text, data))

        def setItemData(self, index, text, role):
            assert index == len(items) - 1

        def blockSignals(self, block):
            calls.append(block)

    combo = Combo()
    panel = types.SimpleNamespace(ui=types.SimpleNamespace(modelComboBox=combo), addLog=None,
                                  _populateModels=lambda: MedDiffFM.MedDiffFMWidget._populateModels(panel),
                                  initializeParameterNode=lambda: calls.append("parameters"))
    MedDiffFM.MedDiffFMWidget.enter(panel)
    assert "mine" not in [data for _text, data in items]
    checkpoints.register_model(checkpoints.resolve_model("tiny"), "mine", "registered from a terminal")
    MedDiffFM.MedDiffFMWidget.enter(panel)
    assert [data for _text, data in items][-1] == "mine" and panel._modelKinds["mine"] == "base"
    # The list is rebuilt with the combo's signals blocked (the parameter node keeps its model), then the GUI updated.
    assert calls == [True, False, "parameters"] * 2


def test_switching_task_drops_a_model_that_cannot_run_the_new_one():
    """One model choice serves every tab: a ControlNet picked for lesions would only fail on Denoise."""
    logged = []
    panel = types.SimpleNamespace(_parameterNode=types.SimpleNamespace(task="generate-lesion", model="tiny-lesion"),
                                  _modelKinds={"tiny-lesion": "lesion", "tiny": "base"}, addLog=logged.append)
    MedDiffFM.MedDiffFMWidget._onTaskChanged(panel, list(MedDiffFM.TASKS).index("inpaint"))
    assert panel._parameterNode.model == "tiny-lesion" and logged == []
    MedDiffFM.MedDiffFMWidget._onTaskChanged(panel, list(MedDiffFM.TASKS).index("denoise"))
    assert panel._parameterNode.task == "denoise" and panel._parameterNode.model == ""
    assert logged == ["Model: Task default for Denoise (tiny-lesion does not run it)."]


def test_library_found_from_the_module_folder_alone(tmp_path):
    """Developer mode puts only .../MedDiffFM on sys.path; the library next to it must still be found."""
    import subprocess

    code = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', %r)]; sys.path.insert(0, %r); "
            "from MedDiffFMUtils import library; print(library.libraryRoot())") % (str(REPO), str(REPO / "MedDiffFM"))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(REPO)


@pytest.mark.parametrize("layout", ["built extension", "source tree"])
def test_library_beside_the_module_wins_over_another_importable_copy(tmp_path, layout):
    """A module from one checkout or install must not run jobs with another copy's library and Models.json."""
    modules = tmp_path / "modules"
    shutil.copytree(REPO / "MedDiffFM" / "MedDiffFMUtils", modules / "MedDiffFMUtils")
    root = modules if layout == "built extension" else tmp_path
    (root / "MedDiffFMLib").mkdir()
    (root / "MedDiffFMLib" / "__init__.py").write_text("")
    # REPO's MedDiffFMLib is importable too, ahead of the module's folder
    code = ("import sys; sys.path[:0] = [%r, %r, %r]; from MedDiffFMUtils import library; print(library.libraryRoot()); "
            "import MedDiffFMLib; print(MedDiffFMLib.__file__)" % (str(REPO), str(modules), str(root)))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(root), str(root / "MedDiffFMLib" / "__init__.py")]


def test_first_use_setup_asks_before_installing(monkeypatch):
    """The consent dialog and pip need the application: both are replaced by recorders here."""
    from MedDiffFMUtils import dependencies

    installed = []
    missing = [["torch", "monai"], []]  # before and after installation
    monkeypatch.setattr(dependencies, "missingImports", lambda: missing[min(len(installed), 1)])
    monkeypatch.setattr(slicer.util, "pip_install", installed.append, raising=False)

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: False, raising=False)
    with pytest.raises(RuntimeError, match="declined"):
        dependencies.setupPythonRequirements(str(REPO), log=lambda text: None)
    assert installed == []

    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True, raising=False)
    assert dependencies.setupPythonRequirements(str(REPO), log=lambda text: None) is True
    requirements = str(REPO / "Resources" / "requirements.txt")
    assert installed == ["torch", ["-r", requirements]]  # no PyTorch Utils here: torch from pip, then the rest
    assert "monai>=1.5" in open(requirements).read().split()


def test_panel_limits_are_the_parameters_and_reach_the_top_of_an_anomaly_map():
    """Each spin box ends where its parameter's range ends; the anomaly threshold reaches the widest model window
    (the map is an absolute difference within it: up to 1800 HU for the chest)."""
    import xml.etree.ElementTree as ET

    from MedDiffFMLib.config import preset

    source = (REPO / "MedDiffFM" / "MedDiffFM.py").read_text()
    ranges = {name: (float(low), float(high)) for name, low, high in
              re.findall(r"(\w+): Annotated\[\w+, WithinRange\(([^,]+), ([^)]+)\)\]", source.replace("2 ** 31 - 1",
                                                                                                   str(2 ** 31 - 1)))}
    tops = {}
    for widget in ET.parse(REPO / "MedDiffFM" / "Resources" / "UI" / "MedDiffFM.ui").getroot().iter("widget"):
        props = {p.get("name"): p[0].text for p in widget.findall("property")}
        if "SlicerParameterName" in props and "maximum" in props:
            tops[props["SlicerParameterName"]] = float(props["maximum"])
    assert len(tops) >= 10 and all(tops[name] == ranges[name][1] for name in tops), (tops, ranges)
    widest = max(high - low for low, high in preset("default").windows.values())
    assert tops["anomalyThreshold"] >= widest

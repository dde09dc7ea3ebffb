"""Standard ultrasound planes as data, and their computation from a patient's labels.

A task names an organ and an acoustic window. Its standard plane passes through
the organ's centroid and contains the organ's principal (longest) axis and the
beam direction from the window to the centroid (the definition of the
project's design, after the long-axis views of abdominal sonography teaching,
e.g. the AIUM practice parameter for the abdominal ultrasound examination).
The goal probe pose follows: the face centre where the window line (the line
through the centroid along the window direction) leaves the skin, the beam axis
(+z) towards the centroid, the array (+x) along the principal axis with its
component along the beam removed, the image plane the probe x-z plane.

Marker (probe -x) convention of the design: towards the patient's head in long
axis views and towards the patient's right in transverse ones. Which applies is
read from the geometry: a view whose array lies closer to the head-foot axis than
to the left-right axis is a long-axis view.

Limitations: the principal axis is that of the labelled voxels (an organ's
shape, not its vessels or hilum); when it is nearly parallel to the beam the
plane is poorly defined, so such a patient does not support the task. The skin is
the 0.5 level of the trilinearly interpolated body mask, the surface that
marching cubes gives before decimation (within about a voxel of the collision
mesh).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from sonoray.assets.patient import Patient

#: Patient axes (RAS): towards the patient's right, anterior, superior.
RIGHT = np.array([1.0, 0.0, 0.0])
ANTERIOR = np.array([0.0, 1.0, 0.0])
SUPERIOR = np.array([0.0, 0.0, 1.0])

#: Smallest angle between principal axis and beam for a well-defined plane (deg).
MIN_AXIS_BEAM_ANGLE_DEG = 10.0
#: Largest angle between the goal beam and the inward skin normal (deg): beyond it a probe
#: face cannot sit on the skin and couple (approx.).
MAX_BEAM_SKIN_ANGLE_DEG = 35.0
#: Half-width of the skin patch whose plane fit gives the skin normal (mm), about a probe face.
SKIN_PATCH_HALF_WIDTH_MM = 10.0
#: Step of the search for the skin along a line (mm).
SKIN_SEARCH_STEP_MM = 0.5


@dataclass(frozen=True)
class AcousticWindow:
    """A place on the skin the beam enters through.

    Attributes:
        name: Identifier, e.g. ``"right_flank"``.
        description: One line for humans.
        toward_window: Unit direction in patient RAS from the organ's centroid towards
            the window; the beam runs the opposite way.
        arm_side: ``"right"`` or ``"left"``: the patient's side of the table where the
            arm's base stands.
        arm_gap_m: Distance from the table's long edge to the arm's base axis (m). A flank
            window, held with the probe horizontal, needs the base farther out (nearer,
            the wrist would sit inside the arm's own base); an anterior one nearer (farther,
            the elbow runs into its limit). Both values checked with the iiwa on the
            phantom pool and the example CT.
    """

    name: str
    description: str
    toward_window: tuple[float, float, float]
    arm_side: str
    arm_gap_m: float

    def direction(self) -> np.ndarray:
        """``toward_window`` as a unit vector, shape ``(3,)``."""
        d = np.asarray(self.toward_window, dtype=np.float64)
        return d / np.linalg.norm(d)


WINDOWS: dict[str, AcousticWindow] = {
    w.name: w
    for w in (
        AcousticWindow(
            "anterior_subcostal",
            "anterior abdomen over the liver, beam tilted 20 degrees towards the head",
            (0.0, math.cos(math.radians(20.0)), -math.sin(math.radians(20.0))),
            "right",
            0.45,
        ),
        AcousticWindow(
            "right_flank",
            "right mid-axillary line, beam towards the left",
            (1, 0, 0),
            "right",
            0.55,
        ),
        AcousticWindow(
            "left_flank", "left mid-axillary line, beam towards the right", (-1, 0, 0), "left", 0.55
        ),
    )
}


@dataclass(frozen=True)
class UltrasoundTask:
    """One standard ultrasound plane to find.

    Attributes:
        name: Task identifier, e.g. ``"kidney_right_long_axis"``.
        description: One line for humans.
        organ: Structure (TotalSegmentator name) the plane cuts.
        window: Key of ``WINDOWS``.
        plane_tolerance_mm: Largest distance of the organ's centroid from the image
            plane that counts as reached.
        angle_tolerance_deg: Largest angle between the image plane and the standard
            plane that counts as reached.
        min_visibility: Smallest target visibility score (``us_quality``) that counts
            as seeing the organ.
    """

    name: str
    description: str
    organ: str
    window: str
    plane_tolerance_mm: float = 5.0
    angle_tolerance_deg: float = 5.0
    min_visibility: float = 0.5

    @property
    def acoustic_window(self) -> AcousticWindow:
        return WINDOWS[self.window]


US_TASKS: dict[str, UltrasoundTask] = {
    t.name: t
    for t in (
        UltrasoundTask(
            "liver_long_axis",
            "liver through its longest (left-right) axis from the anterior abdomen, beam "
            "tilted 20 degrees under the costal margin; marker to the patient's right",
            "liver",
            "anterior_subcostal",
        ),
        UltrasoundTask(
            "kidney_right_long_axis",
            "right kidney along its long axis from the right flank (coronal)",
            "kidney_right",
            "right_flank",
        ),
        UltrasoundTask(
            "kidney_left_long_axis",
            "left kidney along its long axis from the left flank (coronal)",
            "kidney_left",
            "left_flank",
        ),
        UltrasoundTask(
            "spleen_long_axis",
            "spleen along its long axis from the left flank",
            "spleen",
            "left_flank",
        ),
    )
}


class UnsupportedTaskError(ValueError):
    """A patient cannot support a task: organ missing or cut by the scan, no window on
    the skin, organ too deep, or a goal pose the arm cannot reach."""


@dataclass(frozen=True)
class OrganAxes:
    """Centroid and principal axes of a labelled structure.

    Attributes:
        centroid_mm: Centroid in patient RAS mm, ``(3,)``.
        axes: Principal directions as rows, longest first, ``(3, 3)``.
        sd_mm: Standard deviation of the voxel positions along each axis (mm), ``(3,)``.
    """

    centroid_mm: np.ndarray
    axes: np.ndarray
    sd_mm: np.ndarray


@dataclass(frozen=True)
class StandardPlane:
    """A task's standard plane in one patient, and the probe pose that shows it.

    Attributes:
        task: Task name.
        organ: Organ axes the plane comes from.
        beam: Unit beam direction (window to centroid), patient RAS, ``(3,)``.
        normal: Unit normal of the plane (= goal probe +y), ``(3,)``.
        array: Unit array direction in the plane (= goal probe +x, away from the
            marker), ``(3,)``.
        skin_point_mm: Where the window line leaves the skin, ``(3,)``.
        skin_normal: Outward unit skin normal there, ``(3,)``.
        depth_mm: Distance from the skin point to the centroid.
        probe_in_patient: Goal probe pose, 4 x 4 (rotation columns = probe x, y, z;
            translation in mm = ``skin_point_mm``).
    """

    task: str
    organ: OrganAxes
    beam: np.ndarray
    normal: np.ndarray
    array: np.ndarray
    skin_point_mm: np.ndarray
    skin_normal: np.ndarray
    depth_mm: float
    probe_in_patient: np.ndarray

    @property
    def centroid_mm(self) -> np.ndarray:
        return self.organ.centroid_mm


def organ_axes(patient: Patient, organ: str) -> OrganAxes:
    """Centroid and principal axes (PCA of voxel centres in mm) of a structure.

    Raises:
        UnsupportedTaskError: if the structure is absent or touches the border of the
            volume (cut by the scan, so its centroid and axes are not the organ's).
    """
    if not patient.has_structure(organ):
        raise UnsupportedTaskError(f"patient {patient.name!r} has no {organ!r} label")
    idx = np.argwhere(patient.mask(organ))  # (N, 3)
    if (idx.min(0) == 0).any() or (idx.max(0) == np.array(patient.shape) - 1).any():
        raise UnsupportedTaskError(
            f"{organ!r} of patient {patient.name!r} touches the border of the volume "
            "(cut by the scan)"
        )
    xyz_mm = patient.voxel_to_patient(idx)
    centroid = xyz_mm.mean(0)
    var_mm2, vec = np.linalg.eigh(np.cov((xyz_mm - centroid).T))
    order = np.argsort(var_mm2)[::-1]
    return OrganAxes(centroid, vec[:, order].T.copy(), np.sqrt(np.maximum(var_mm2[order], 0.0)))


def standard_plane(
    patient: Patient, task_: UltrasoundTask, max_depth_mm: float | None = None
) -> StandardPlane:
    """The standard plane of ``task_`` in ``patient`` and its goal probe pose.

    Args:
        patient: The patient twin.
        task_: The task.
        max_depth_mm: Deepest centroid the probe can image (the preset's depth);
            ``None`` skips the check.

    Raises:
        UnsupportedTaskError: naming why the patient cannot support the task.
    """
    axes = organ_axes(patient, task_.organ)
    toward_window = task_.acoustic_window.direction()
    beam = -toward_window
    principal = axes.axes[0]

    angle_deg = np.degrees(np.arccos(min(1.0, abs(float(principal @ beam)))))
    if angle_deg < MIN_AXIS_BEAM_ANGLE_DEG:
        raise UnsupportedTaskError(
            f"{task_.organ!r} of patient {patient.name!r}: principal axis {angle_deg:.0f} deg "
            f"from the beam of window {task_.window!r} (need >= {MIN_AXIS_BEAM_ANGLE_DEG:.0f})"
        )
    array = _unit(principal - (principal @ beam) * beam)
    array = _orient_array(array)
    normal = np.cross(beam, array)

    skin = skin_crossing_mm(patient, axes.centroid_mm, toward_window)
    if skin is None:
        raise UnsupportedTaskError(
            f"the line from the {task_.organ!r} centroid towards window {task_.window!r} "
            f"does not leave patient {patient.name!r}'s body inside the volume"
        )
    depth_mm = float(np.linalg.norm(skin - axes.centroid_mm))
    if max_depth_mm is not None and depth_mm > max_depth_mm:
        raise UnsupportedTaskError(
            f"{task_.organ!r} of patient {patient.name!r} lies {depth_mm:.0f} mm deep, "
            f"beyond the imaging depth {max_depth_mm:.0f} mm"
        )
    skin_normal = skin_normal_mm(patient, skin, toward_window)
    tilt_deg = np.degrees(np.arccos(np.clip(-(skin_normal @ beam), -1.0, 1.0)))
    if tilt_deg > MAX_BEAM_SKIN_ANGLE_DEG:
        raise UnsupportedTaskError(
            f"window {task_.window!r} of patient {patient.name!r}: the beam meets the skin "
            f"{tilt_deg:.0f} deg off its normal (at most {MAX_BEAM_SKIN_ANGLE_DEG:.0f})"
        )

    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = array, normal, beam, skin
    return StandardPlane(task_.name, axes, beam, normal, array, skin, skin_normal, depth_mm, pose)


def supported_tasks(patient: Patient, max_depth_mm: float | None = None) -> list[str]:
    """Names of the tasks whose standard plane ``patient`` supports."""
    out = []
    for name, t in US_TASKS.items():
        try:
            standard_plane(patient, t, max_depth_mm)
        except UnsupportedTaskError:
            continue
        out.append(name)
    return out


def skin_crossing_mm(
    patient: Patient, inside_mm: np.ndarray, direction: np.ndarray, max_mm: float = 500.0
) -> np.ndarray | None:
    """Where the ray from a point inside the body along ``direction`` first leaves it.

    Args:
        patient: The patient twin.
        inside_mm: Start point in patient mm; must lie inside the body mask.
        direction: Direction of the ray (need not be unit).
        max_mm: Longest search.

    Returns:
        The crossing of the body mask's 0.5 level in patient mm, ``(3,)``, or ``None``
        when the start is outside the body or the ray leaves the volume first.
    """
    hits = skin_crossings_mm(patient, np.asarray(inside_mm, float)[None], direction, max_mm)
    return None if np.isnan(hits[0, 0]) else hits[0]


def skin_crossings_mm(
    patient: Patient, inside_mm: np.ndarray, direction: np.ndarray, max_mm: float = 500.0
) -> np.ndarray:
    """Batched :func:`skin_crossing_mm`: ``(N, 3)`` starts, one direction; NaN rows where
    a ray finds no crossing."""
    d = _unit(np.asarray(direction, dtype=np.float64))
    t_mm = np.arange(0.0, max_mm + SKIN_SEARCH_STEP_MM, SKIN_SEARCH_STEP_MM)  # (T,)
    points = inside_mm[:, None, :] + t_mm[None, :, None] * d  # (N, T, 3)
    ijk = patient.patient_to_voxel(points)
    inside = _body_field(patient, ijk)  # (N, T)

    starts_inside = inside[:, 0] >= 0.5
    below = inside < 0.5
    first = np.argmax(below, axis=1)  # (N,)
    found = starts_inside & below.any(axis=1)
    # Linear interpolation of the 0.5 crossing between the last inside and first outside sample.
    rows = np.arange(len(points))
    before = np.maximum(first - 1, 0)
    f0, f1 = inside[rows, before], inside[rows, first]
    frac = np.clip((f0 - 0.5) / np.maximum(f0 - f1, 1e-9), 0.0, 1.0)
    t_hit = t_mm[before] + frac * SKIN_SEARCH_STEP_MM
    out = inside_mm + t_hit[:, None] * d
    out[~found] = np.nan
    return out


def skin_normal_mm(patient: Patient, skin_mm: np.ndarray, outward_hint: np.ndarray) -> np.ndarray:
    """Outward unit skin normal at a skin point: plane fit to a patch of skin about a
    probe face wide, found along rays parallel to ``outward_hint``."""
    hint = _unit(np.asarray(outward_hint, dtype=np.float64))
    u, v = _tangent_basis(hint)
    g = np.linspace(-SKIN_PATCH_HALF_WIDTH_MM, SKIN_PATCH_HALF_WIDTH_MM, 5)
    a, b = np.meshgrid(g, g, indexing="ij")
    offsets = a.reshape(-1, 1) * u + b.reshape(-1, 1) * v  # (25, 3)
    # Start a little inside the skin so each ray crosses it once.
    starts = skin_mm + offsets - 2.0 * SKIN_PATCH_HALF_WIDTH_MM * hint
    hits = skin_crossings_mm(patient, starts, hint, max_mm=4.0 * SKIN_PATCH_HALF_WIDTH_MM)
    hits = hits[~np.isnan(hits[:, 0])]
    if len(hits) < 3:
        return hint
    _, _, vt = np.linalg.svd(hits - hits.mean(0))
    n = vt[2]
    return n if n @ hint > 0 else -n


def _body_field(patient: Patient, ijk: np.ndarray) -> np.ndarray:
    """Body mask, trilinearly interpolated at fractional voxel indices ``(..., 3)``."""
    field = ndimage.map_coordinates(
        patient.body_mask.view(np.uint8),
        ijk.reshape(-1, 3).T,
        order=1,
        mode="constant",
        cval=0.0,
        output=np.float32,
    )
    return field.reshape(ijk.shape[:-1])


def _orient_array(array: np.ndarray) -> np.ndarray:
    """Sign of the array direction that puts the marker (-x) towards the head (long
    axis) or the patient's right (transverse)."""
    toward = SUPERIOR if abs(array @ SUPERIOR) >= abs(array @ RIGHT) else RIGHT
    return -array if array @ toward > 0 else array


def _tangent_basis(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = RIGHT if abs(n @ RIGHT) < 0.9 else ANTERIOR
    u = _unit(np.cross(n, helper))
    return u, np.cross(n, u)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)

"""Frames and units of the scene: world metres, patient RAS millimetres, rigid poses.

Conventions (DESIGN section 2):

- World (PyBullet): metres, z up, floor at z = 0, the table's long axis along x.
  The patient lies supine with the head towards +x, so patient superior = world +x,
  anterior = world +z and the patient's right = world +y.
- Patient: millimetres in RAS (+x right, +y anterior, +z superior).

Every 4 x 4 matrix in this package is a rigid transform in metres: rotation and
translation, no scale. ``patient_in_world`` maps a patient point expressed in
*metres* to world metres; patient points in millimetres are divided by
:data:`MM_PER_M` first (:func:`patient_mm_to_world_m` does both). This keeps every
matrix orthonormal, so inverses are transposes and PyBullet poses convert without
rescaling. Quaternions are ``(x, y, z, w)`` like PyBullet's.

Reference: the RAS patient coordinate convention of NIfTI-1 (``qform``/``sform``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Millimetres per metre.
MM_PER_M = 1000.0

#: Rotation taking patient axes (R, A, S) to world axes: column ``i`` is patient axis ``i``
#: in world coordinates (R -> +y, A -> +z, S -> +x).
PATIENT_AXES_IN_WORLD = np.array(
    [
        [0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
    ]
)
PATIENT_AXES_IN_WORLD.setflags(write=False)


def _finite_vector(name: str, value: Sequence[float] | np.ndarray, length: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (length,):
        raise ValueError(f"{name} must have {length} values, got shape {arr.shape}: {value!r}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return arr


def quat_to_matrix(quat_xyzw: Sequence[float] | np.ndarray) -> np.ndarray:
    """3 x 3 rotation matrix of a quaternion ``(x, y, z, w)`` (normalised here)."""
    q = _finite_vector("quat_xyzw", quat_xyzw, 4)
    norm = np.linalg.norm(q)
    if norm < 1e-12:
        raise ValueError(f"quat_xyzw must be non-zero, got {quat_xyzw!r}")
    x, y, z, w = q / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quat(rotation: np.ndarray) -> np.ndarray:
    """Quaternion ``(x, y, z, w)`` with ``w >= 0`` of a 3 x 3 rotation matrix.

    Uses Shepperd's method (largest diagonal term first) for numerical stability.
    """
    m = np.asarray(rotation, dtype=np.float64)
    if m.shape != (3, 3) or not np.all(np.isfinite(m)):
        raise ValueError(f"rotation must be a finite 3 x 3 matrix, got {m!r}")
    trace = np.trace(m)
    diag = np.diag(m)
    if trace >= diag.max():
        w = 0.5 * np.sqrt(1.0 + trace)
        q = np.array([m[2, 1] - m[1, 2], m[0, 2] - m[2, 0], m[1, 0] - m[0, 1], 4 * w * w]) / (4 * w)
    else:
        i = int(diag.argmax())
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[k, k])
        q = np.empty(4)
        q[i] = 0.25 * s
        q[j] = (m[j, i] + m[i, j]) / s
        q[k] = (m[k, i] + m[i, k]) / s
        q[3] = (m[k, j] - m[j, k]) / s
    q /= np.linalg.norm(q)
    return q if q[3] >= 0 else -q


def pose_to_matrix(
    position_m: Sequence[float] | np.ndarray, quat_xyzw: Sequence[float] | np.ndarray
) -> np.ndarray:
    """4 x 4 rigid transform (metres) from a position and a quaternion ``(x, y, z, w)``."""
    out = np.eye(4)
    out[:3, :3] = quat_to_matrix(quat_xyzw)
    out[:3, 3] = _finite_vector("position_m", position_m, 3)
    return out


def matrix_to_pose(transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position (metres) and quaternion ``(x, y, z, w)`` of a 4 x 4 rigid transform."""
    t = np.asarray(transform, dtype=np.float64)
    if t.shape != (4, 4):
        raise ValueError(f"transform must be 4 x 4, got shape {t.shape}")
    return t[:3, 3].copy(), matrix_to_quat(t[:3, :3])


def invert_rigid(transform: np.ndarray) -> np.ndarray:
    """Inverse of a 4 x 4 rigid transform (transpose of the rotation)."""
    t = np.asarray(transform, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = t[:3, :3].T
    out[:3, 3] = -t[:3, :3].T @ t[:3, 3]
    return out


def rotation_about_axis(axis: Sequence[float] | np.ndarray, angle_deg: float) -> np.ndarray:
    """3 x 3 right-handed rotation by ``angle_deg`` about ``axis`` (Rodrigues' formula)."""
    a = _finite_vector("axis", axis, 3)
    norm = np.linalg.norm(a)
    if norm < 1e-12:
        raise ValueError(f"axis must be non-zero, got {axis!r}")
    if not np.isfinite(angle_deg):
        raise ValueError(f"angle_deg must be finite, got {angle_deg!r}")
    x, y, z = a / norm
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    theta = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(theta) * k + (1.0 - np.cos(theta)) * (k @ k)


def patient_in_world_matrix(
    anchor_in_patient_mm: Sequence[float] | np.ndarray,
    anchor_in_world_m: Sequence[float] | np.ndarray,
    yaw_deg: float = 0.0,
) -> np.ndarray:
    """Pose of the patient frame in the world for a supine, head-towards-+x patient.

    The patient's axes are turned into the world by :data:`PATIENT_AXES_IN_WORLD`, then
    by ``yaw_deg`` about the world vertical through the anchor (positive turns the head
    from +x towards +y, counter-clockwise seen from above); the patient point
    ``anchor_in_patient_mm`` lands on ``anchor_in_world_m``.

    Args:
        anchor_in_patient_mm: A patient point in RAS millimetres.
        anchor_in_world_m: Where that point goes, world metres.
        yaw_deg: Rotation about world z, degrees.

    Returns:
        4 x 4 rigid transform in metres; apply it to patient points divided by
        :data:`MM_PER_M` (see :func:`patient_mm_to_world_m`).
    """
    anchor_p = _finite_vector("anchor_in_patient_mm", anchor_in_patient_mm, 3) / MM_PER_M
    anchor_w = _finite_vector("anchor_in_world_m", anchor_in_world_m, 3)
    rotation = rotation_about_axis((0.0, 0.0, 1.0), yaw_deg) @ PATIENT_AXES_IN_WORLD
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = anchor_w - rotation @ anchor_p
    return out


def patient_mm_to_world_m(points_mm: np.ndarray, patient_in_world: np.ndarray) -> np.ndarray:
    """Map patient RAS points ``(..., 3)`` in mm to world points ``(..., 3)`` in metres."""
    p = np.asarray(points_mm, dtype=np.float64) / MM_PER_M
    return p @ patient_in_world[:3, :3].T + patient_in_world[:3, 3]


def world_m_to_patient_mm(points_m: np.ndarray, patient_in_world: np.ndarray) -> np.ndarray:
    """Map world points ``(..., 3)`` in metres to patient RAS points ``(..., 3)`` in mm."""
    p = np.asarray(points_m, dtype=np.float64) - patient_in_world[:3, 3]
    return (p @ patient_in_world[:3, :3]) * MM_PER_M


def world_to_patient_direction(directions: np.ndarray, patient_in_world: np.ndarray) -> np.ndarray:
    """Express world directions ``(..., 3)`` in patient axes (unitless, no translation)."""
    return np.asarray(directions, dtype=np.float64) @ patient_in_world[:3, :3]

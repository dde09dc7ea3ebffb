"""Mobile C-arm: kinematic controller with enforced joint limits and X-ray geometry.

The C-arm (``assets/urdf/c_arm.urdf``) stands on the floor beside the table. Its five
joints, in the order of every public vector here:

- ``longitudinal`` (mm): travel of the cart along the table (world x);
- ``lateral`` (mm): travel of the column across the table (world y);
- ``lift`` (mm): height of the support arm (world z);
- ``orbital`` (degrees): rotation of the C in its own plane about the patient's long axis
  through the isocentre, LAO (> 0) / RAO (< 0);
- ``angular`` (degrees): propeller rotation about the horizontal support arm (world y
  through the isocentre), cranial (> 0) / caudal (< 0).

Sign conventions, with the scene's placement (cart on the patient's left, world -y;
head towards world +x): at zero angles the tube is under the table and the detector
straight above the isocentre (AP view, beam from posterior to anterior). Positive
orbital turns the detector towards the patient's left, so at +30 degrees the detector
faces the patient's left-anterior side (LAO 30) and at +90 degrees the beam runs from
the patient's right to left (a left lateral view). Positive angular tilts the detector
towards the head (cranial). Kinematically the angular joint carries the orbital one
(the whole C turns about the support arm; the C slides in its holder); both axes pass
through the fixed isocentre, so rotations never move it.

Image convention (DESIGN section 2): image columns run along ``u`` (``col_dir``), rows
along ``v`` (``row_dir``), both unit vectors in the detector plane: ``v`` is the
patient's inferior direction projected on the detector plane (head up) and
``u = v x d``, with ``d`` the viewing direction from the detector towards the source:
the image as seen from the detector's side. At the AP view this is the frontal display
convention, head up and the patient's right on the viewer's left (``u`` points to the
patient's left). The orbital range does not reach a PA view, where the two conventions
would differ. ``u`` and ``v`` coincide with the detector link's x and y axes when the
angular joint is at zero; otherwise the panel is turned about the central ray relative
to them (at orbital 90 degrees an angular rotation spins the panel about the beam), and
``u``, ``v`` are the panel's plane turned head-up, as a C-arm's image rotation does.

Reference: geometry and ranges of the Siemens Cios-like mobile C-arm of DeepDRR's
``MobileCArm`` (Unberath et al., MICCAI 2018; Killeen et al., 2023).

Limitations: joints move instantly (no velocity or acceleration limits); PyBullet's
``resetJointState`` ignores URDF limits, so limits are only those enforced here; the
mechanical C is drawn concentric with the isocentre (real mobile C-arms are often
slightly non-isocentric), and at the ends of the orbital range the C's end passes
through its holder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from importlib import resources

import numpy as np

from sonoray.envs.frames import (
    MM_PER_M,
    pose_to_matrix,
    world_m_to_patient_mm,
    world_to_patient_direction,
)

#: Joint names in the order of every command and state vector.
JOINT_NAMES: tuple[str, ...] = ("longitudinal", "lateral", "lift", "orbital", "angular")
_PRISMATIC = frozenset({"longitudinal", "lateral", "lift"})
_UNITS = {name: ("mm" if name in _PRISMATIC else "deg") for name in JOINT_NAMES}

#: Force / torque the hold motors may use when the simulation is stepped (N, N m).
_HOLD_FORCE = 1.0e5


@dataclass(frozen=True)
class CArmGeometry:
    """Imaging geometry of the C-arm (Siemens Cios-like, as in DeepDRR's ``MobileCArm``).

    The URDF's source and detector links realise these distances; a test checks that
    they agree.

    Attributes:
        source_to_detector_mm: Focal spot to detector face along the central ray.
        source_to_isocentre_mm: Focal spot to the isocentre.
        detector_size_mm: Side of the square flat detector.
        detector_pixels: Pixels along each side at full resolution (1536 at about 0.194 mm).
    """

    source_to_detector_mm: float = 1020.0
    source_to_isocentre_mm: float = 530.0
    detector_size_mm: float = 300.0
    detector_pixels: int = 1536

    @property
    def pixel_spacing_mm(self) -> float:
        return self.detector_size_mm / self.detector_pixels


CARM_GEOMETRY = CArmGeometry()


@dataclass(frozen=True)
class CArmLimits:
    """Joint ranges enforced by :class:`CArm` (lower, upper), in mm and degrees.

    Defaults follow a mobile C-arm (DeepDRR's ``MobileCArm``: orbital about -40 to +110
    degrees, angulation about +-45 degrees near a patient, lift +-215 mm). Narrower
    ranges are allowed; wider ones than the URDF's are rejected.
    """

    longitudinal_mm: tuple[float, float] = (-400.0, 400.0)
    lateral_mm: tuple[float, float] = (-150.0, 150.0)
    lift_mm: tuple[float, float] = (-215.0, 215.0)
    orbital_deg: tuple[float, float] = (-40.0, 110.0)
    angular_deg: tuple[float, float] = (-45.0, 45.0)

    def __post_init__(self) -> None:
        for f in fields(self):
            low, high = getattr(self, f.name)
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise ValueError(
                    f"CArmLimits.{f.name} must be finite with lower <= upper, got ({low}, {high})"
                )
            default_low, default_high = f.default
            if low < default_low or high > default_high:
                raise ValueError(
                    f"CArmLimits.{f.name} = ({low}, {high}) exceeds the mechanical range "
                    f"({default_low}, {default_high})"
                )

    def range_of(self, joint: str) -> tuple[float, float]:
        """(lower, upper) of a joint by name, in its public unit."""
        return getattr(self, f"{joint}_{_UNITS[joint]}")


@dataclass(frozen=True)
class CommandReport:
    """What a command asked for and what the C-arm did (public units: mm, degrees).

    Attributes:
        requested: Target per joint before limits.
        applied: Joint value after the command.
        limited: Joints whose target lay outside their range and were stopped at it.
    """

    requested: dict[str, float]
    applied: dict[str, float]
    limited: tuple[str, ...] = ()

    @property
    def hit_limit(self) -> bool:
        return bool(self.limited)

    def as_info(self) -> dict:
        """Plain-type summary for a Gymnasium ``info`` dict."""
        return {
            "limit_hit": self.hit_limit,
            "limited_joints": list(self.limited),
            "requested": dict(self.requested),
            "applied": dict(self.applied),
        }


@dataclass(frozen=True)
class ExposureGeometry:
    """Cone-beam geometry of one exposure in patient RAS millimetres.

    Field names follow ``sonoray.sensors.xray_geometry.XRayGeometry.from_carm``, which
    :meth:`sensor_kwargs` feeds.

    Attributes:
        source_mm: Focal spot, ``(3,)``.
        detector_centre_mm: Centre of the detector face, ``(3,)``.
        row_dir: Unit vector along which the row index grows (image down, ``v``), ``(3,)``.
        col_dir: Unit vector along which the column index grows (image right, ``u``), ``(3,)``.
        pixel_mm: (row spacing, column spacing).
        rows: Image height in pixels.
        cols: Image width in pixels.
    """

    source_mm: np.ndarray
    detector_centre_mm: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_mm: tuple[float, float]
    rows: int
    cols: int

    @property
    def detector_size_mm(self) -> tuple[float, float]:
        """(height along rows, width along columns)."""
        return (self.rows * self.pixel_mm[0], self.cols * self.pixel_mm[1])

    @property
    def beam_direction(self) -> np.ndarray:
        """Unit vector from the source to the detector centre (the central ray)."""
        d = self.detector_centre_mm - self.source_mm
        return d / np.linalg.norm(d)

    @property
    def source_to_detector_mm(self) -> float:
        return float(np.linalg.norm(self.detector_centre_mm - self.source_mm))

    def sensor_kwargs(self) -> dict:
        """Keyword arguments of ``XRayGeometry.from_carm`` (the batched torch geometry)."""
        return {
            "source_mm": self.source_mm,
            "detector_centre_mm": self.detector_centre_mm,
            "row_dir": self.row_dir,
            "col_dir": self.col_dir,
            "pixel_mm": self.pixel_mm,
            "rows": self.rows,
            "cols": self.cols,
        }


def _as_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"C-arm command for {name!r} must be a number, got {value!r}") from None


def c_arm_urdf_path() -> str:
    """File path of the C-arm URDF inside the installed ``sonoray.assets`` package."""
    return str(resources.files("sonoray.assets") / "urdf" / "c_arm.urdf")


class CArm:
    """Kinematic controller of the C-arm in one PyBullet client.

    Args:
        client: A ``pybullet_utils.bullet_client.BulletClient``.
        base_pose_world: (position_m, quat_xyzw) of the URDF root: the floor point under
            the isocentre at zero joints, x along the table, y from the cart to the table.
        limits: Joint ranges to enforce.
        geometry: Detector size and pixel count reported in :class:`ExposureGeometry`.
    """

    def __init__(
        self,
        client,
        base_pose_world: tuple[Sequence[float], Sequence[float]] = ((0.0, 0.0, 0.0), (0, 0, 0, 1)),
        limits: CArmLimits | None = None,
        geometry: CArmGeometry = CARM_GEOMETRY,
    ) -> None:
        self._client = client
        self.limits = limits if limits is not None else CArmLimits()
        self.geometry = geometry
        position, quat = base_pose_world
        self._base_in_world = pose_to_matrix(position, quat)
        self.body_id: int = client.loadURDF(
            c_arm_urdf_path(),
            basePosition=list(position),
            baseOrientation=list(quat),
            useFixedBase=True,
            flags=client.URDF_USE_INERTIA_FROM_FILE,
        )
        by_name = {}
        for j in range(client.getNumJoints(self.body_id)):
            info = client.getJointInfo(self.body_id, j)
            by_name[info[1].decode()] = j
            by_name[info[12].decode()] = j
        self._joint_index = tuple(by_name[n] for n in JOINT_NAMES)
        self.link_index: dict[str, int] = {
            name: by_name[name] for name in ("cart", "c_holder", "c_arc", "source", "detector")
        }
        self._values = dict.fromkeys(JOINT_NAMES, 0.0)
        self.reset()

    # ----- joint state ----------------------------------------------------------------------

    @property
    def joint_names(self) -> tuple[str, ...]:
        return JOINT_NAMES

    def joints_mm_deg(self) -> dict[str, float]:
        """Current joint values by name, mm and degrees, in :data:`JOINT_NAMES` order."""
        return dict(self._values)

    def joints_array(self) -> np.ndarray:
        """Current joint values ``(5,)`` in :data:`JOINT_NAMES` order, mm and degrees."""
        return np.array([self._values[n] for n in JOINT_NAMES])

    def reset(self, joints: Sequence[float] | Mapping[str, float] | None = None) -> CommandReport:
        """Move to ``joints`` (absolute; all zero when ``None``); limits apply as in `command`."""
        target = dict.fromkeys(JOINT_NAMES, 0.0)
        return self._apply(target if joints is None else self._targets(joints, False, target))

    def command(
        self, values: Sequence[float] | Mapping[str, float], *, relative: bool = True
    ) -> CommandReport:
        """Move the joints, stopping each at its limit.

        Args:
            values: Five values in :data:`JOINT_NAMES` order, or a mapping from joint
                names to values (joints not named keep their value); mm and degrees.
            relative: Values are increments (True) or absolute targets (False).

        Returns:
            The report of requested and applied values and of the joints that hit a limit.

        Raises:
            ValueError: on a wrong length, an unknown joint name or a non-finite value.
        """
        return self._apply(self._targets(values, relative, self._values))

    def _targets(
        self,
        values: Sequence[float] | Mapping[str, float],
        relative: bool,
        start: Mapping[str, float],
    ) -> dict[str, float]:
        if isinstance(values, Mapping):
            unknown = sorted(set(values) - set(JOINT_NAMES))
            if unknown:
                raise ValueError(f"unknown C-arm joints {unknown}; allowed: {list(JOINT_NAMES)}")
            given = {name: _as_float(name, value) for name, value in values.items()}
        else:
            arr = np.asarray(values, dtype=np.float64)
            if arr.shape != (len(JOINT_NAMES),):
                raise ValueError(
                    f"C-arm command needs {len(JOINT_NAMES)} values {list(JOINT_NAMES)}, "
                    f"got shape {arr.shape}: {values!r}"
                )
            given = dict(zip(JOINT_NAMES, arr.tolist(), strict=True))
        for name, value in given.items():
            if not math.isfinite(value):
                raise ValueError(f"C-arm command for {name!r} must be finite, got {value!r}")
        target = dict(start)
        for name, value in given.items():
            target[name] = start[name] + value if relative else float(value)
        return target

    def _apply(self, target: dict[str, float]) -> CommandReport:
        applied, limited = {}, []
        for name in JOINT_NAMES:
            low, high = self.limits.range_of(name)
            value = min(max(target[name], low), high)
            if value != target[name]:
                limited.append(name)
            applied[name] = value
        positions = [self._to_si(n, applied[n]) for n in JOINT_NAMES]
        for index, q in zip(self._joint_index, positions, strict=True):
            self._client.resetJointState(self.body_id, index, q, 0.0)
        # Hold motors keep the pose if another device steps the simulation.
        self._client.setJointMotorControlArray(
            self.body_id,
            list(self._joint_index),
            self._client.POSITION_CONTROL,
            targetPositions=positions,
            forces=[_HOLD_FORCE] * len(positions),
        )
        self._values = applied
        return CommandReport(requested=dict(target), applied=dict(applied), limited=tuple(limited))

    @staticmethod
    def _to_si(name: str, value: float) -> float:
        return value / MM_PER_M if name in _PRISMATIC else math.radians(value)

    # ----- geometry -------------------------------------------------------------------------

    def link_in_world(self, link: str) -> np.ndarray:
        """4 x 4 pose (metres) of a link frame: ``cart``, ``c_holder``, ``c_arc``, ``source``
        or ``detector``."""
        state = self._client.getLinkState(
            self.body_id, self.link_index[link], computeForwardKinematics=True
        )
        return pose_to_matrix(state[4], state[5])

    def source_detector_in_world(self) -> tuple[np.ndarray, np.ndarray]:
        """Poses (4 x 4, metres) of the focal spot and of the detector face centre.

        The source frame's z is the central ray. The detector frame's z is the face
        normal towards the source; its x and y are the panel's edges, equal to the image
        axes ``u`` and ``v`` of :meth:`xray_geometry_in_patient` at zero angular.
        """
        return self.link_in_world("source"), self.link_in_world("detector")

    def isocentre_world(self) -> np.ndarray:
        """Isocentre (world metres, ``(3,)``): where the orbital and angular axes meet."""
        return self.link_in_world("c_holder")[:3, 3]

    def beam_direction(self) -> np.ndarray:
        """Unit vector (world) of the central ray, from the source to the detector."""
        source, detector = self.source_detector_in_world()
        d = detector[:3, 3] - source[:3, 3]
        return d / np.linalg.norm(d)

    def xray_geometry_in_patient(
        self, patient_in_world: np.ndarray, pixels: int | None = None
    ) -> ExposureGeometry:
        """Source, detector centre and axes in patient RAS mm for the X-ray sensor.

        Args:
            patient_in_world: 4 x 4 rigid pose of the patient frame (metres, see
                :mod:`sonoray.envs.frames`).
            pixels: Detector pixels per side for the image to render; the full-resolution
                count of :class:`CArmGeometry` when ``None``.
        """
        n = self.geometry.detector_pixels if pixels is None else pixels
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"pixels must be a positive integer, got {pixels!r}")
        n = int(n)
        source, detector = self.source_detector_in_world()
        points = world_m_to_patient_mm(np.stack([source[:3, 3], detector[:3, 3]]), patient_in_world)
        beam = points[1] - points[0]
        beam /= np.linalg.norm(beam)
        # Head up: v is the patient's inferior direction (-z) projected on the detector plane.
        v = np.array([0.0, 0.0, -1.0]) - (-beam[2]) * beam
        if np.linalg.norm(v) < 1e-6:  # beam along the body axis: keep the panel's own axis
            v = world_to_patient_direction(detector[:3, 1], patient_in_world)
        v /= np.linalg.norm(v)
        u = np.cross(v, -beam)
        spacing = self.geometry.detector_size_mm / n
        return ExposureGeometry(
            source_mm=points[0],
            detector_centre_mm=points[1],
            row_dir=v,
            col_dir=u,
            pixel_mm=(spacing, spacing),
            rows=n,
            cols=n,
        )

    @property
    def base_in_world(self) -> np.ndarray:
        return self._base_in_world.copy()

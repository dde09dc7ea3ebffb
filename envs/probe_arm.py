"""KUKA LBR iiwa holding an ultrasound probe: probe-frame motion, limit-aware IK, contact.

The arm is ``kuka_iiwa/model.urdf`` from ``pybullet_data`` (iiwa 14 R820 geometry) with one
extra fixed link, the probe, whose link frame is the probe frame of
:mod:`sonoray.sensors.probes`: origin at the centre of the probe face, +z along the beam
into the tissue, +x along the array (marker at the -x end), +y = z cross x. Its collision
shape is the convex hull of the probe head (the face arc or flat face, extruded over the
housing's thickness) and a tapered handle up to the flange.

A move is given in the probe frame (slide in x-y, rotate about z, tilt about x and y through
the centre of the face, an optional push along z) and becomes joint positions through
damped least squares on PyBullet's Jacobian, clamped to the joint limits, iterated until the
forward-kinematics residual is below 0.01 mm and 0.01 degrees; a pose whose residual stays
above ``ik_tolerance_mm`` / ``ik_tolerance_deg`` is reported unreachable and the arm does not
move. Joints are set kinematically (``resetJointState``), so a step is deterministic.

Along the probe axis the contact force is regulated by
:class:`~sonoray.envs.force_control.AdmittanceController` on a
:class:`~sonoray.envs.force_control.TissueSpring`; the indentation of each element comes
from a PyBullet ray cast along the probe axis through the element, from above the face
(``ray_above_mm``) to below it (``ray_below_mm``), against every body but the arm itself.
Elements within ``coupling_tolerance_mm`` of the skin are coupled (their scan lines see
tissue); the others look into air.

Tunnelling guard: motions per step are limited (:class:`StepLimits`); the commanded pose is
ray-tested and pulled back along its axis until no element is deeper than the indentation
at which the spring alone reaches the force cap; the pose IK reaches is ray-tested again
and pulled back the same way (skin met sideways, unseen from the commanded pose), and a
move that cannot be made safe is refused; axial travel per step stays within what the rays
see. So the spring force cannot exceed the cap and the face cannot pass through the skin
in one step.

Main reference: Buss, "Introduction to inverse kinematics with Jacobian transpose,
pseudoinverse and damped least squares methods" (2004), for the IK.

Limitations: the robot is kinematic (no dynamics, no joint velocity limits within a step);
the rays start ``ray_above_mm`` above each element, so skin rising more than that within one
step (a wall met sideways) is invisible to the guard; any body under the face (the table
too) counts as tissue; the skin does not deform, so the image does not show compression;
one row of rays at zero elevation, so a tilt about the array axis does not change coupling;
the reachable workspace with a 16 cm probe is narrow (with the base 0.6 m from a torso's
midline, the flanks beyond about 8 cm from it are out of reach for an array along the body);
PyBullet contact points between the probe and the skin are expected (the probe indents it
by design; see :meth:`ProbeArm.exclude_from_contacts`).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pybullet
import pybullet_data
import trimesh
from scipy.spatial.transform import Rotation

from sonoray.envs import frames
from sonoray.envs.force_control import AdmittanceController, TissueSpring
from sonoray.sensors.probes import ProbePreset, element_positions_mm, get_preset

#: URDF of the arm inside ``pybullet_data``.
ARM_URDF = "kuka_iiwa/model.urdf"

#: Collision-filter group bit given to every link of the arm; the contact rays skip it.
ARM_COLLISION_GROUP = 1 << 10

#: Pull-backs the tunnelling guard tries on the IK pose before it refuses a move, and the
#: depth beyond the limit it tolerates (mm).
_GUARD_ATTEMPTS = 4
_GUARD_TOLERANCE_MM = 1e-3

#: Extra reach of the contact rays beyond what a step needs (mm).
_RAY_MARGIN_MM = 20.0

#: Joint angles (degrees) the arm starts in: elbow up, flange pointing straight down.
HOME_JOINTS_DEG = (0.0, 30.0, 0.0, -90.0, 0.0, 60.0, 0.0)

#: Probe mount and housing (mm). A design choice, not a vendor drawing: a holder plus a
#: hand-held probe about 14 cm long, its head a few mm wider than the array.
FLANGE_IN_LINK7_MM = 45.0  # iiwa link 7 mesh ends at its flange 45 mm along +z
PROBE_LENGTH_MM = 160.0  # flange to the centre of the face
PROBE_HEAD_DEPTH_MM = 50.0  # from the face back to where the handle starts to taper
PROBE_WALL_MM = 4.0  # housing beyond the array on each side
PROBE_GRIP_HALF_MM = (15.0, 12.0)  # handle half-widths at the flange (x, y)


@dataclass(frozen=True)
class StepLimits:
    """Largest motion one :meth:`ProbeArm.move` performs; larger commands are clipped.

    Attributes:
        slide_mm: Each of the x and y slides (mm).
        rotate_deg: Rotation about the probe axis (degrees).
        tilt_deg: Each of the tilts about x and y (degrees).
        push_mm: Commanded push along the probe axis (mm).
        axial_travel_mm: Axial move of the force controller within one step (mm).
    """

    slide_mm: float = 20.0
    rotate_deg: float = 15.0
    tilt_deg: float = 10.0
    push_mm: float = 10.0
    axial_travel_mm: float = 30.0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not (np.isfinite(value) and value > 0.0):
                raise ValueError(f"StepLimits.{name} must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class MoveResult:
    """Outcome of one probe move, for the env's ``info``.

    Attributes:
        reachable: False when IK could not reach the pose; the arm then stayed put.
        position_error_mm: Forward-kinematics position residual of the IK solution.
        orientation_error_deg: Forward-kinematics orientation residual of the IK solution.
        clipped: Names of the command components clipped to :class:`StepLimits`.
        guarded: Whether the tunnelling guard pulled the commanded pose back.
        force_n: Contact force after the move, probe at rest (N): the spring's part.
        peak_force_n: Largest force during the move's control periods (N), the tissue
            damper's transient included; the safety cap applies to it.
        force_converged: Whether the force is within tolerance of the target (False when
            force control was off).
        force_iterations: Admittance control periods used.
        coupled_fraction: Fraction of elements in contact with the skin.
        safety_violation: Whether the force reached the cap.
    """

    reachable: bool
    position_error_mm: float
    orientation_error_deg: float
    clipped: tuple[str, ...]
    guarded: bool
    force_n: float
    peak_force_n: float
    force_converged: bool
    force_iterations: int
    coupled_fraction: float
    safety_violation: bool


def _probe_hull(preset: ProbePreset) -> trimesh.Trimesh:
    """Convex collision hull of the probe in the probe frame (metres)."""
    elements_mm = element_positions_mm(preset).numpy()
    half_x = float(np.abs(elements_mm[:, 0]).max()) + PROBE_WALL_MM
    half_y = 0.5 * preset.elevation_height_mm + PROBE_WALL_MM
    if preset.is_convex:
        angle = np.linspace(-1.0, 1.0, 17) * math.asin(min(half_x / preset.radius_mm, 1.0))
        face_x = preset.radius_mm * np.sin(angle)
        face_z = preset.radius_mm * (np.cos(angle) - 1.0)
    else:
        face_x, face_z = np.array([-half_x, half_x]), np.zeros(2)
    head_z = -PROBE_HEAD_DEPTH_MM
    grip_x, grip_y = PROBE_GRIP_HALF_MM
    points = [(x, y, z) for x, z in zip(face_x, face_z, strict=True) for y in (-half_y, half_y)]
    points += [(x, y, head_z) for x in (-half_x, half_x) for y in (-half_y, half_y)]
    points += [(x, y, -PROBE_LENGTH_MM) for x in (-grip_x, grip_x) for y in (-grip_y, grip_y)]
    return trimesh.convex.convex_hull(np.asarray(points) / frames.MM_PER_M)


def _arm_urdf(preset: ProbePreset, mesh_path: Path) -> str:
    """The iiwa URDF with the probe link attached to its flange."""
    data = Path(pybullet_data.getDataPath())
    text = (data / ARM_URDF).read_text()
    text = text.replace('filename="meshes/', f'filename="{(data / ARM_URDF).parent}/meshes/')
    mount_m = (FLANGE_IN_LINK7_MM + PROBE_LENGTH_MM) / frames.MM_PER_M
    probe = f"""
  <link name="probe">
    <inertial>
      <origin rpy="0 0 0" xyz="0 0 0"/>
      <mass value="0.3"/>
      <inertia ixx="0.001" ixy="0" ixz="0" iyy="0.001" iyz="0" izz="0.001"/>
    </inertial>
    <visual><geometry><mesh filename="{mesh_path}"/></geometry>
      <material name="probe_white"><color rgba="0.9 0.9 0.92 1"/></material></visual>
    <collision><geometry><mesh filename="{mesh_path}"/></geometry></collision>
  </link>
  <joint name="probe_mount" type="fixed">
    <parent link="lbr_iiwa_link_7"/>
    <child link="probe"/>
    <origin rpy="0 0 0" xyz="0 0 {mount_m:.6f}"/>
  </joint>
</robot>"""
    tail = text.rindex("</robot>")
    return text[:tail] + probe + text[tail + len("</robot>") :]


def _rotation_error(rotation: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rotation vector (rad, world axes) that turns ``rotation`` into ``target``."""
    return Rotation.from_matrix(target @ rotation.T).as_rotvec()


def _check_vector(name: str, value, length: int = 3) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (length,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be {length} finite numbers, got {value!r}")
    return array


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


class ProbeArm:
    """The iiwa with its probe in one PyBullet world.

    Args:
        client: A ``pybullet_utils.bullet_client.BulletClient``.
        base_pose_world: ``(position_m, quat_xyzw)`` of the arm's base.
        preset: Probe preset name or :class:`~sonoray.sensors.probes.ProbePreset`.
        spring: Tissue model; default :class:`TissueSpring()`.
        controller: Force controller; default :class:`AdmittanceController()` (5 N).
        limits: Per-move limits.
        coupling_tolerance_mm: Largest gap between an element and the skin that still
            couples (a gel layer).
        ik_tolerance_mm: Position residual above which a pose is unreachable.
        ik_tolerance_deg: Orientation residual above which a pose is unreachable.
        joint_margin_deg: IK keeps this far inside every joint limit.

    Attributes:
        body_id: PyBullet id of the arm (the probe is its link ``probe_link``).
        probe_link: Link index of the probe (its frame is the probe frame).
        preset: The probe preset.
        lower_limits_rad, upper_limits_rad: ``(7,)`` joint limits from the URDF.
    """

    def __init__(
        self,
        client,
        base_pose_world: tuple,
        preset: str | ProbePreset = "convex",
        *,
        spring: TissueSpring | None = None,
        controller: AdmittanceController | None = None,
        limits: StepLimits | None = None,
        coupling_tolerance_mm: float = 0.5,
        ik_tolerance_mm: float = 1.0,
        ik_tolerance_deg: float = 0.5,
        joint_margin_deg: float = 1.0,
    ) -> None:
        self.preset = get_preset(preset)
        self.spring = spring if spring is not None else TissueSpring()
        self.controller = controller if controller is not None else AdmittanceController()
        self.limits = limits if limits is not None else StepLimits()
        self.coupling_tolerance_mm = _check_finite("coupling_tolerance_mm", coupling_tolerance_mm)
        self.ik_tolerance_mm = _check_finite("ik_tolerance_mm", ik_tolerance_mm)
        self.ik_tolerance_deg = _check_finite("ik_tolerance_deg", ik_tolerance_deg)
        for name in ("coupling_tolerance_mm", "ik_tolerance_mm", "ik_tolerance_deg"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self._client = client

        with tempfile.TemporaryDirectory() as folder:
            mesh_path = Path(folder) / "probe.obj"
            _probe_hull(self.preset).export(mesh_path)
            urdf_path = Path(folder) / "iiwa_probe.urdf"
            urdf_path.write_text(_arm_urdf(self.preset, mesh_path))
            self.body_id = client.loadURDF(str(urdf_path), useFixedBase=True)
        self.probe_link = client.getNumJoints(self.body_id) - 1
        self._joints = list(range(self.probe_link))
        info = [client.getJointInfo(self.body_id, j) for j in self._joints]
        self.lower_limits_rad = np.array([i[8] for i in info])
        self.upper_limits_rad = np.array([i[9] for i in info])
        margin_deg = _check_finite("joint_margin_deg", joint_margin_deg)
        if margin_deg < 0.0:
            raise ValueError(f"joint_margin_deg must be >= 0, got {margin_deg}")
        margin = math.radians(margin_deg)
        self._ik_low = self.lower_limits_rad + margin
        self._ik_high = self.upper_limits_rad - margin
        for link in range(-1, client.getNumJoints(self.body_id)):
            client.setCollisionFilterGroupMask(self.body_id, link, ARM_COLLISION_GROUP, -1)

        self._elements_m = element_positions_mm(self.preset).numpy() / frames.MM_PER_M
        self._set_joints(np.radians(HOME_JOINTS_DEG))
        self.set_base_pose(*base_pose_world)

    @property
    def ray_above_mm(self) -> float:
        """How far above the face the contact rays start (mm): far enough to see the deepest
        allowed element after the largest single motion (a push, a slide up a 45-degree
        slope, both tilts of the face's ends) with a margin."""
        edge_mm = float(np.abs(self._elements_m[:, 0]).max()) * frames.MM_PER_M
        return (
            self._max_indentation_mm
            + self.limits.push_mm
            + 2.0 * self.limits.slide_mm
            + 2.0 * edge_mm * math.sin(math.radians(self.limits.tilt_deg))
            + _RAY_MARGIN_MM
        )

    @property
    def ray_below_mm(self) -> float:
        """How far below the face the contact rays reach (mm): one step's axial travel and a
        margin, so an approach never descends onto skin it has not seen."""
        return self.limits.axial_travel_mm + _RAY_MARGIN_MM

    @property
    def _max_indentation_mm(self) -> float:
        return self.spring.max_indentation_mm(self.controller.force_cap_n)

    # ----- setup --------------------------------------------------------------------------

    def set_base_pose(self, position_m, quat_xyzw) -> None:
        """Move the arm's base link frame (joints unchanged) and re-measure the contact."""
        self._base_in_world = frames.pose_to_matrix(position_m, quat_xyzw)
        # PyBullet places a base by its centre of mass, not its link frame.
        inertial = self._client.getDynamicsInfo(self.body_id, -1)
        position, quat = frames.matrix_to_pose(
            self._base_in_world @ frames.pose_to_matrix(inertial[3], inertial[4])
        )
        self._client.resetBasePositionAndOrientation(self.body_id, position, quat)
        self._measure_now()

    def reset_joints(self, joint_positions_rad=None) -> None:
        """Put the joints at ``joint_positions_rad`` (default: the home pose).

        Raises:
            ValueError: if a value is not finite or lies outside the joint limits.
        """
        q = np.radians(HOME_JOINTS_DEG) if joint_positions_rad is None else joint_positions_rad
        q = np.asarray(q, dtype=np.float64)
        if q.shape != (len(self._joints),) or not np.all(np.isfinite(q)):
            raise ValueError(
                f"joint_positions_rad must be {len(self._joints)} finite values, got {q}"
            )
        outside = (q < self.lower_limits_rad) | (q > self.upper_limits_rad)
        if outside.any():
            raise ValueError(
                f"joint_positions_rad {q} outside the limits [{self.lower_limits_rad}, "
                f"{self.upper_limits_rad}] at joints {np.flatnonzero(outside)}"
            )
        self._set_joints(q)
        self._measure_now()

    def exclude_from_contacts(self, body_id: int) -> None:
        """Stop PyBullet reporting contacts between the probe and ``body_id`` (a skin mesh,
        which the probe indents by design). Ray tests are unaffected."""
        self._client.setCollisionFilterPair(self.body_id, body_id, self.probe_link, -1, 0)

    @property
    def target_force_n(self) -> float:
        return self.controller.target_force_n

    @target_force_n.setter
    def target_force_n(self, value: float) -> None:
        self.controller.set_target(value)

    # ----- queries ------------------------------------------------------------------------

    def probe_in_world(self) -> np.ndarray:
        """4 x 4 pose of the probe frame in the world (metres)."""
        state = self._client.getLinkState(
            self.body_id, self.probe_link, computeForwardKinematics=True
        )
        return frames.pose_to_matrix(state[4], state[5])

    def probe_in_patient(self, patient_in_world: np.ndarray) -> np.ndarray:
        """4 x 4 pose of the probe frame in the patient frame, translation in millimetres
        (what the ultrasound sensor takes). ``patient_in_world`` is rigid, in metres
        (:mod:`sonoray.envs.frames`)."""
        pose = frames.invert_rigid(patient_in_world) @ self.probe_in_world()
        pose[:3, 3] *= frames.MM_PER_M
        return pose

    def joint_positions(self) -> np.ndarray:
        """``(7,)`` joint angles (rad)."""
        return self._q.copy()

    def force_n(self) -> float:
        """Contact force along the probe axis with the probe at rest (N); the damper's
        transient during a move shows in ``MoveResult.peak_force_n``."""
        return self._force_n

    def element_indentation_mm(self) -> np.ndarray:
        """``(n_elements,)`` indentation per element (mm; < 0 is a gap, ``-inf`` = no skin
        within ``ray_below_mm``)."""
        return self._indentation_mm.copy()

    def indentation_mm(self) -> float:
        """Deepest indentation of any element (mm), 0 when off the skin."""
        return max(0.0, float(self._indentation_mm.max()))

    def coupling(self) -> np.ndarray:
        """``(n_elements,)`` bool: element (and its scan line) in acoustic contact."""
        return self._indentation_mm >= -self.coupling_tolerance_mm

    # ----- motion -------------------------------------------------------------------------

    def move(
        self,
        slide_x_mm: float = 0.0,
        slide_y_mm: float = 0.0,
        rotate_deg: float = 0.0,
        tilt_x_deg: float = 0.0,
        tilt_y_deg: float = 0.0,
        push_mm: float = 0.0,
        regulate_force: bool = True,
    ) -> MoveResult:
        """Move the probe in its own frame, then regulate the contact force.

        The command is applied in the current probe frame in this order: slide by
        ``(slide_x_mm, slide_y_mm, push_mm)``, rotate about z, tilt about the new x, tilt
        about the new y, every rotation about the centre of the face. Each component is
        clipped to :attr:`limits` (listed in ``MoveResult.clipped``).

        Args:
            slide_x_mm, slide_y_mm: Slide along the probe's x (array) and y axes.
            rotate_deg: Rotation about the probe axis.
            tilt_x_deg, tilt_y_deg: Tilts about the probe's x and y axes.
            push_mm: Move along the probe axis, + into the tissue (with force control on, the
                controller then corrects it).
            regulate_force: Run the admittance controller after the move.

        Raises:
            ValueError: if a component is not a finite number.
        """
        command = {
            "slide_x_mm": slide_x_mm,
            "slide_y_mm": slide_y_mm,
            "rotate_deg": rotate_deg,
            "tilt_x_deg": tilt_x_deg,
            "tilt_y_deg": tilt_y_deg,
            "push_mm": push_mm,
        }
        bound = {
            "slide_x_mm": self.limits.slide_mm,
            "slide_y_mm": self.limits.slide_mm,
            "rotate_deg": self.limits.rotate_deg,
            "tilt_x_deg": self.limits.tilt_deg,
            "tilt_y_deg": self.limits.tilt_deg,
            "push_mm": self.limits.push_mm,
        }
        clipped = []
        for name, value in command.items():
            value = _check_finite(name, value)
            command[name] = float(np.clip(value, -bound[name], bound[name]))
            if command[name] != value:
                clipped.append(name)

        delta = np.eye(4)
        delta[:3, 3] = (
            np.array([command["slide_x_mm"], command["slide_y_mm"], command["push_mm"]])
            / frames.MM_PER_M
        )
        delta[:3, :3] = (
            frames.rotation_about_axis((0.0, 0.0, 1.0), command["rotate_deg"])
            @ frames.rotation_about_axis((1.0, 0.0, 0.0), command["tilt_x_deg"])
            @ frames.rotation_about_axis((0.0, 1.0, 0.0), command["tilt_y_deg"])
        )
        target = self.probe_in_world() @ delta
        return self._go(
            target,
            self._indentation_mm,
            regulate_force,
            self.limits.axial_travel_mm,
            tuple(clipped),
            seeds=(self._q,),
        )

    def place_on_skin(
        self,
        point_world,
        normal_world,
        target_force_n: float | None = None,
        x_axis_world=(-1.0, 0.0, 0.0),
    ) -> MoveResult:
        """Put the face centre on a skin point, axis along ``-normal_world``, and regulate.

        IK starts from the home pose, so the result does not depend on where the arm was.

        Args:
            point_world: Skin point (world metres).
            normal_world: Outward skin normal there.
            target_force_n: Force to hold from now on (default: keep the current target).
            x_axis_world: Direction the array (+x) should point, projected onto the skin's
                tangent plane; the default puts the marker (-x) towards the patient's head.

        Raises:
            ValueError: for non-finite or degenerate vectors, or a target out of range.
        """
        point = _check_vector("point_world", point_world)
        normal = _check_vector("normal_world", normal_world)
        x_hint = _check_vector("x_axis_world", x_axis_world)
        if np.linalg.norm(normal) < 1e-9:
            raise ValueError(f"normal_world must be non-zero, got {normal_world!r}")
        if target_force_n is not None:
            self.target_force_n = target_force_n
        z_axis = -normal / np.linalg.norm(normal)
        x_axis = x_hint - (x_hint @ z_axis) * z_axis
        if np.linalg.norm(x_axis) < 1e-6:
            raise ValueError(f"x_axis_world {x_axis_world!r} is parallel to the normal")
        x_axis /= np.linalg.norm(x_axis)
        target = np.eye(4)
        target[:3, :3] = np.column_stack([x_axis, np.cross(z_axis, x_axis), z_axis])
        target[:3, 3] = point
        # The face starts on the skin at rest (previous=None): no damper force from placing it.
        seeds = (np.radians(HOME_JOINTS_DEG), self._pybullet_ik(target))
        return self._go(target, None, True, self.ray_below_mm, (), seeds)

    # ----- internals ----------------------------------------------------------------------

    def _go(self, target, previous, regulate_force, travel_mm, clipped, seeds) -> MoveResult:
        """Guard, regulate, solve IK, check and commit one move to ``target`` (4 x 4, metres).

        ``previous`` is the per-element indentation one control period before the move
        (for the tissue damper; ``None``: at rest where it starts); ``seeds`` are the IK
        starting joint vectors, tried in order.
        """
        start = self._cast(target)
        guard_mm = min(0.0, self._max_indentation_mm - float(start.max()))
        start = start + guard_mm
        previous = start if previous is None else previous
        period_s = self.controller.control_period_s
        if regulate_force:
            run = self.controller.regulate(start, previous, self.spring, travel_mm)
            offset_mm, peak_n, iterations = run.offset_mm, run.peak_force_n, run.iterations
        else:
            offset_mm, iterations = 0.0, 0
            peak_n = self.spring.force_n(start, previous, period_s)
        target = target.copy()
        target[:3, 3] += target[:3, 2] * (guard_mm + offset_mm) / frames.MM_PER_M

        # Check the pose IK really reaches: skin the commanded pose's rays could not see
        # (a wall met sideways) may put an element too deep; pull back along the axis.
        corrected = False
        for _ in range(_GUARD_ATTEMPTS):
            q, pose, position_error_mm, orientation_error_deg = self._solve_ik(target, seeds)
            safe = reachable = (
                position_error_mm <= self.ik_tolerance_mm
                and orientation_error_deg <= self.ik_tolerance_deg
            )
            if not reachable:
                break
            indentation = self._cast(pose)
            excess_mm = float(indentation.max()) - self._max_indentation_mm
            safe = excess_mm <= _GUARD_TOLERANCE_MM
            if safe:
                break
            corrected = True
            target[:3, 3] -= target[:3, 2] * excess_mm / frames.MM_PER_M
            seeds = (q,)
        if safe:
            self._set_joints(q)
            self._indentation_mm = indentation
            self._force_n = self.spring.force_n(indentation)
            # Unseen skin met within one period: count its damper force too.
            moved_n = self.spring.force_n(indentation, previous, period_s) if corrected else 0.0
            peak_n = max(peak_n, self._force_n, moved_n)
        else:
            peak_n = self._force_n
        error_n = abs(self._force_n - self.target_force_n)
        return MoveResult(
            reachable=safe,
            position_error_mm=position_error_mm,
            orientation_error_deg=orientation_error_deg,
            clipped=clipped,
            guarded=guard_mm < 0.0 or corrected,
            force_n=self._force_n,
            peak_force_n=peak_n,
            force_converged=safe and regulate_force and error_n <= self.controller.tolerance_n,
            force_iterations=iterations,
            coupled_fraction=float(self.coupling().mean()),
            safety_violation=peak_n >= self.controller.force_cap_n,
        )

    def _cast(self, probe_in_world: np.ndarray) -> np.ndarray:
        """Indentation (mm) of each element of a probe at ``probe_in_world``, by ray tests."""
        rotation, origin = probe_in_world[:3, :3], probe_in_world[:3, 3]
        elements = self._elements_m @ rotation.T + origin  # (N, 3)
        axis = rotation[:, 2]
        above_m = self.ray_above_mm / frames.MM_PER_M
        below_m = self.ray_below_mm / frames.MM_PER_M
        hits = self._client.rayTestBatch(
            (elements - above_m * axis).tolist(),
            (elements + below_m * axis).tolist(),
            collisionFilterMask=~ARM_COLLISION_GROUP,
        )
        hit_body = np.array([h[0] for h in hits])
        fraction = np.array([h[2] for h in hits])
        # Hit distance past the element along the axis; the skin lies that far below it.
        depth_mm = fraction * (self.ray_above_mm + self.ray_below_mm) - self.ray_above_mm
        return np.where(hit_body >= 0, -depth_mm, -np.inf)

    def _measure_now(self) -> None:
        """Ray-test the probe where it is; the force is the elastic one (probe at rest)."""
        self._indentation_mm = self._cast(self.probe_in_world())
        self._force_n = self.spring.force_n(self._indentation_mm)

    def _set_joints(self, q: np.ndarray) -> None:
        self._q = np.array(q, dtype=np.float64)
        self._client.resetJointStatesMultiDof(
            self.body_id, self._joints, [[v] for v in self._q], [[0.0]] * len(self._joints)
        )
        # Hold the pose if someone steps the simulation.
        self._client.setJointMotorControlArray(
            self.body_id, self._joints, pybullet.POSITION_CONTROL, targetPositions=self._q
        )

    def _forward(self, q: np.ndarray) -> np.ndarray:
        self._client.resetJointStatesMultiDof(self.body_id, self._joints, [[v] for v in q])
        state = self._client.getLinkState(
            self.body_id, self.probe_link, computeForwardKinematics=True
        )
        return frames.pose_to_matrix(state[4], state[5])

    def _pybullet_ik(self, target: np.ndarray) -> np.ndarray:
        """PyBullet's null-space IK from the home pose: a seed for far targets."""
        position, quat = frames.matrix_to_pose(target)
        home = np.radians(HOME_JOINTS_DEG)
        q = self._client.calculateInverseKinematics(
            self.body_id,
            self.probe_link,
            position.tolist(),
            quat.tolist(),
            lowerLimits=self._ik_low.tolist(),
            upperLimits=self._ik_high.tolist(),
            jointRanges=(self._ik_high - self._ik_low).tolist(),
            restPoses=home.tolist(),
            currentPositions=home.tolist(),
            maxNumIterations=100,
            residualThreshold=1e-6,
        )
        return np.clip(np.asarray(q), self._ik_low, self._ik_high)

    def _solve_ik(self, target: np.ndarray, seeds) -> tuple:
        """IK from each seed in turn until one reaches ``target`` within tolerance.

        Returns:
            ``(q, probe_in_world, position_error_mm, orientation_error_deg)`` of the last
            seed's best iterate (the first within tolerance, if any).
        """
        for seed in seeds:
            q, pose, position_error_mm, orientation_error_deg = self._damped_least_squares(
                target, seed
            )
            if (
                position_error_mm <= self.ik_tolerance_mm
                and orientation_error_deg <= self.ik_tolerance_deg
            ):
                break
        return q, pose, position_error_mm, orientation_error_deg

    def _damped_least_squares(self, target: np.ndarray, seed: np.ndarray, max_iterations=60):
        """Damped least squares within the joint limits, from ``seed``.

        Returns:
            ``(q, probe_in_world, position_error_mm, orientation_error_deg)`` of the best
            iterate; the joints are restored to :attr:`_q` afterwards.
        """
        q = np.clip(seed, self._ik_low, self._ik_high)
        base = self._base_in_world[:3, :3]
        zeros = [0.0] * len(q)
        damping = 1e-3
        best = (q, None, math.inf, math.inf)
        for _ in range(max_iterations):
            pose = self._forward(q)
            position_error = target[:3, 3] - pose[:3, 3]
            rotation_error = _rotation_error(pose[:3, :3], target[:3, :3])
            error = np.concatenate([position_error, rotation_error])
            position_error_mm = float(np.linalg.norm(position_error)) * frames.MM_PER_M
            orientation_error_deg = math.degrees(float(np.linalg.norm(rotation_error)))
            if position_error_mm + orientation_error_deg < best[2] + best[3]:
                best = (q, pose, position_error_mm, orientation_error_deg)
            if position_error_mm < 1e-2 and orientation_error_deg < 1e-2:
                break
            linear, angular = self._client.calculateJacobian(
                self.body_id, self.probe_link, [0.0, 0.0, 0.0], q.tolist(), zeros, zeros
            )
            # PyBullet gives the Jacobian in the base frame; the errors are in world axes.
            jacobian = np.vstack([base @ linear, base @ angular])  # (6, 7)
            # Joints at a limit and pushed further are frozen for this iteration.
            free = np.ones(len(q), dtype=bool)
            for _ in range(2):
                j = jacobian[:, free]
                step = np.zeros(len(q))
                step[free] = j.T @ np.linalg.solve(j @ j.T + damping * np.eye(6), error)
                blocked = ((q <= self._ik_low) & (step < 0)) | ((q >= self._ik_high) & (step > 0))
                if not blocked.any():
                    break
                free &= ~blocked
            largest = np.abs(step).max()
            if largest > 0.3:
                step *= 0.3 / largest
            q = np.clip(q + step, self._ik_low, self._ik_high)
        self._forward(self._q)
        return best

"""The PyBullet world: floor, table, a pool of patients, the C-arm and the ultrasound arm.

One ``BulletClient`` (DIRECT) per scene; never the module-level pybullet functions,
which talk to whichever client connected first. Everything is created once in the
constructor: every patient of the pool becomes a static concave mesh from its skin
surface (patient millimetres scaled to metres), parked far below the floor until it is
made active. Resets only move bodies and joints; they create no shapes and load no files
(both leak memory in PyBullet).

Layout (DESIGN section 2): world metres, z up, floor at z = 0. The table top is a box
centred on the world origin in x and y, its long axis along x, with a pedestal at the
foot end (-x) so that the X-ray tube fits under it. The active patient lies supine,
head towards +x, the lowest (posterior) point of the skin on the table top, centred
on the table (plus the requested offset and yaw). The C-arm stands on the patient's
left (world -y) with its isocentre above the table's centre line; the ultrasound arm
stands on a pedestal beside the table, on the side of the task's acoustic window.

Collisions are read with ``getClosestPoints``, pair by pair among the named bodies:
Bullet builds no contact manifolds between two static bodies (table, patient, arm stand,
a fixed robot base), so ``getContactPoints`` would miss some pairs, and closest points
need no simulation step and honour a margin. They ignore PyBullet's collision filters.

Limitations: the patient is rigid (no soft tissue deformation in the physics; the
ultrasound arm's tissue model handles indentation); a concave mesh has no inside, so a
device entirely inside the body without crossing the skin is not reported; the table
and pedestals extend below the floor when lowered (hidden from view) instead of
telescoping.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pybullet
from pybullet_utils.bullet_client import BulletClient

from sonoray.assets.patient import Patient
from sonoray.envs.carm import CArm, CArmLimits
from sonoray.envs.frames import (
    MM_PER_M,
    matrix_to_pose,
    matrix_to_quat,
    patient_in_world_matrix,
    rotation_about_axis,
)

logger = logging.getLogger(__name__)


def direct_client() -> BulletClient:
    """A headless PyBullet client; its native banner is kept off this process's stdout.

    PyBullet's C code prints ``argv[0]=`` when it connects; command lines here promise
    that stdout carries only their results, so the file descriptor is muted meanwhile.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            return BulletClient(connection_mode=pybullet.DIRECT)
    finally:
        os.dup2(saved, 1)
        os.close(saved)


SIDES = ("left", "right")

#: Colours (RGBA) of the scene's bodies.
_SKIN_RGBA = (0.89, 0.71, 0.60, 1.0)
_TABLE_TOP_RGBA = (0.22, 0.27, 0.33, 1.0)
_PEDESTAL_RGBA = (0.62, 0.64, 0.67, 1.0)
_FLOOR_RGBA = (0.80, 0.79, 0.76, 1.0)

#: Depth of the table pedestal and arm stand below their top: reaches the floor at any
#: allowed height (m).
_COLUMN_DEPTH_M = 2.5


@dataclass(frozen=True)
class SceneConfig:
    """Configuration of a :class:`Scene` (metres unless named otherwise).

    Attributes:
        table_height_m: Height of the table top above the floor.
        table_height_range_m: Heights :meth:`Scene.set_table_height` accepts.
        table_length_m: Along world x.
        table_width_m: Along world y.
        table_thickness_m: Of the table top (a carbon-fibre top is a few cm).
        pedestal_inset_m: From the foot end of the table to the pedestal's centre.
        pedestal_size_m: Pedestal cross-section (x, y).
        park_z_m: Height at which inactive patients wait, out of every view.
        carm: Load the C-arm.
        carm_x_m: World x of the C-arm's isocentre at zero longitudinal travel.
        carm_limits: Joint ranges the C-arm controller enforces.
        probe_arm: Load the ultrasound arm (``sonoray.envs.probe_arm.ProbeArm``).
        probe_arm_side: ``"left"`` or ``"right"`` of the patient, the side of the
            task's acoustic window.
        probe_preset: Probe preset handed to ``ProbeArm``.
        probe_arm_x_m: World x of the arm's base (the abdomen lies inferior to the
            table's centre, at -x).
        probe_arm_gap_m: From the table's long edge to the arm's base axis.
        probe_arm_below_top_m: Height of the arm's base below the table top.
        probe_arm_stand_size_m: Side of the square pedestal the arm stands on.
        gravity_m_s2: Magnitude of gravity (along -z).
    """

    table_height_m: float = 0.85
    table_height_range_m: tuple[float, float] = (0.60, 1.20)
    table_length_m: float = 2.0
    table_width_m: float = 0.56
    table_thickness_m: float = 0.05
    pedestal_inset_m: float = 0.17
    pedestal_size_m: tuple[float, float] = (0.30, 0.36)
    park_z_m: float = -50.0
    carm: bool = True
    carm_x_m: float = 0.0
    carm_limits: CArmLimits = CArmLimits()
    probe_arm: bool = False
    probe_arm_side: str = "right"
    probe_preset: str = "convex"
    probe_arm_x_m: float = -0.30
    probe_arm_gap_m: float = 0.16
    probe_arm_below_top_m: float = 0.05
    probe_arm_stand_size_m: float = 0.24
    gravity_m_s2: float = 9.81

    def __post_init__(self) -> None:
        low, high = self.table_height_range_m
        if not (0.0 < low <= high):
            raise ValueError(f"table_height_range_m must satisfy 0 < low <= high, got {low, high}")
        if not (low <= self.table_height_m <= high):
            raise ValueError(
                f"table_height_m = {self.table_height_m} lies outside table_height_range_m "
                f"{self.table_height_range_m}"
            )
        for name in (
            "table_length_m",
            "table_width_m",
            "table_thickness_m",
            "probe_arm_gap_m",
            "probe_arm_stand_size_m",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.probe_arm_side not in SIDES:
            raise ValueError(f"probe_arm_side must be one of {SIDES}, got {self.probe_arm_side!r}")
        if self.park_z_m > -10.0:
            raise ValueError(f"park_z_m must be at most -10 m (out of view), got {self.park_z_m}")


@dataclass(frozen=True)
class Collision:
    """Two named bodies' links closer than the query margin (negative = penetration)."""

    body_a: str
    link_a: str
    body_b: str
    link_b: str
    distance_m: float


class Scene:
    """Floor, table, patient pool and devices in one PyBullet DIRECT client.

    Args:
        patients: The pool; each becomes a static mesh once, here.
        config: Sizes, heights and which devices to load.
    """

    def __init__(self, patients: Sequence[Patient], config: SceneConfig | None = None) -> None:
        if len(patients) == 0:
            raise ValueError("Scene needs at least one patient, got an empty sequence")
        self.config = config if config is not None else SceneConfig()
        self.patients: tuple[Patient, ...] = tuple(patients)
        self.client = direct_client()
        try:
            self._build()
        except Exception:
            self.close()
            raise

    # ----- construction ---------------------------------------------------------------------

    def _build(self) -> None:
        self.client.setGravity(0.0, 0.0, -self.config.gravity_m_s2)
        self._table_height_m = self.config.table_height_m
        # Link names per body: set here for the bodies built here, read from URDFs otherwise.
        self._link_names: dict[int, dict[int, str]] = {}

        self._make_floor()
        self.table_id = self._make_table()
        self._link_names[self.table_id] = {-1: "table"}
        self.patient_ids: tuple[int, ...] = tuple(
            self._make_patient_body(i, p) for i, p in enumerate(self.patients)
        )
        self._link_names.update({body: {-1: "skin"} for body in self.patient_ids})
        self._anchors_mm = tuple(_posterior_anchor_mm(p) for p in self.patients)
        self.active_index = 0
        self._offset_xy_m = (0.0, 0.0)
        self._yaw_deg = 0.0
        self._patient_in_world = np.eye(4)

        self.carm: CArm | None = None
        if self.config.carm:
            floor_under_isocentre = (self.config.carm_x_m, 0.0, 0.0)
            self.carm = CArm(
                self.client, (floor_under_isocentre, (0.0, 0.0, 0.0, 1.0)), self.config.carm_limits
            )

        self.probe_arm = None
        self.arm_stand_id: int | None = None
        self.probe_arm_side = self.config.probe_arm_side
        if self.config.probe_arm:
            from sonoray.envs.probe_arm import ProbeArm

            self.arm_stand_id = self._make_arm_stand()
            self._link_names[self.arm_stand_id] = {-1: "stand"}
            position, quat = self._probe_arm_base_pose(self.probe_arm_side)
            self.probe_arm = ProbeArm(
                self.client, (position, quat), preset=self.config.probe_preset
            )
            self.place_probe_arm(self.probe_arm_side)

        self.set_active_patient(0)

    def _box(self, half_extents, rgba, collision: bool = True, offset=(0.0, 0.0, 0.0)):
        c = self.client
        col = -1
        if collision:
            col = c.createCollisionShape(
                c.GEOM_BOX, halfExtents=half_extents, collisionFramePosition=offset
            )
        vis = c.createVisualShape(
            c.GEOM_BOX, halfExtents=half_extents, rgbaColor=rgba, visualFramePosition=offset
        )
        return col, vis

    def _make_floor(self) -> int:
        _, vis = self._box((6.0, 6.0, 0.01), _FLOOR_RGBA, collision=False)
        return self.client.createMultiBody(0, -1, vis, basePosition=(0.0, 0.0, -0.01))

    def _make_table(self) -> int:
        c, cfg = self.client, self.config
        top_half = (cfg.table_length_m / 2, cfg.table_width_m / 2, cfg.table_thickness_m / 2)
        top_offset = (0.0, 0.0, -cfg.table_thickness_m / 2)
        ped_half = (cfg.pedestal_size_m[0] / 2, cfg.pedestal_size_m[1] / 2, _COLUMN_DEPTH_M / 2)
        ped_x = -cfg.table_length_m / 2 + cfg.pedestal_inset_m
        ped_offset = (ped_x, 0.0, -cfg.table_thickness_m - _COLUMN_DEPTH_M / 2)
        col = c.createCollisionShapeArray(
            [c.GEOM_BOX, c.GEOM_BOX],
            halfExtents=[top_half, ped_half],
            collisionFramePositions=[top_offset, ped_offset],
        )
        vis = c.createVisualShapeArray(
            [c.GEOM_BOX, c.GEOM_BOX],
            halfExtents=[top_half, ped_half],
            visualFramePositions=[top_offset, ped_offset],
            rgbaColors=[_TABLE_TOP_RGBA, _PEDESTAL_RGBA],
        )
        return c.createMultiBody(0, col, vis, basePosition=(0.0, 0.0, self._table_height_m))

    def _make_patient_body(self, index: int, patient: Patient) -> int:
        # The body frame is the patient frame in metres, so its pose is patient_in_world.
        c = self.client
        mesh = patient.skin_mesh
        vertices_m = (np.asarray(mesh.vertices) / MM_PER_M).tolist()
        indices = np.asarray(mesh.faces, dtype=np.int64).ravel().tolist()
        col = c.createCollisionShape(c.GEOM_MESH, vertices=vertices_m, indices=indices)
        vis = c.createVisualShape(
            c.GEOM_MESH,
            vertices=vertices_m,
            indices=indices,
            normals=np.asarray(mesh.vertex_normals).tolist(),
            rgbaColor=_SKIN_RGBA,
        )
        if col < 0 or vis < 0:
            raise RuntimeError(f"PyBullet could not create the skin mesh of {patient.name!r}")
        logger.debug("patient %s: %d skin faces", patient.name, len(mesh.faces))
        return c.createMultiBody(0, col, vis, basePosition=self._parking_position(index))

    def _make_arm_stand(self) -> int:
        half = self.config.probe_arm_stand_size_m / 2
        col, vis = self._box(
            (half, half, _COLUMN_DEPTH_M / 2), _PEDESTAL_RGBA, offset=(0, 0, -_COLUMN_DEPTH_M / 2)
        )
        return self.client.createMultiBody(0, col, vis)

    def _parking_position(self, index: int) -> tuple[float, float, float]:
        return (5.0 * index, 0.0, self.config.park_z_m)

    # ----- patients and table ---------------------------------------------------------------

    @property
    def table_top_z_m(self) -> float:
        return self._table_height_m

    @property
    def patient_in_world(self) -> np.ndarray:
        """4 x 4 rigid pose (metres) of the active patient's frame; see ``frames``."""
        return self._patient_in_world.copy()

    @property
    def active_patient(self) -> Patient:
        return self.patients[self.active_index]

    @property
    def active_patient_id(self) -> int:
        return self.patient_ids[self.active_index]

    def set_active_patient(
        self, index: int, offset_xy_m: Sequence[float] = (0.0, 0.0), yaw_deg: float = 0.0
    ) -> np.ndarray:
        """Lay patient ``index`` on the table and park the previous one; moves bodies only.

        Args:
            index: Position in the pool.
            offset_xy_m: Shift (world x, y) from the table's centre.
            yaw_deg: Rotation about the vertical; positive turns the head towards +y.

        Returns:
            The new ``patient_in_world``.
        """
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"patient index must be an integer, got {index!r}")
        if not 0 <= index < len(self.patients):
            raise ValueError(f"patient index must be in [0, {len(self.patients)}), got {index}")
        offset = np.asarray(offset_xy_m, dtype=np.float64)
        if offset.shape != (2,) or not np.all(np.isfinite(offset)):
            raise ValueError(f"offset_xy_m must be two finite numbers, got {offset_xy_m!r}")
        if not math.isfinite(yaw_deg):
            raise ValueError(f"yaw_deg must be finite, got {yaw_deg!r}")

        c = self.client
        if index != self.active_index:
            c.resetBasePositionAndOrientation(
                self.active_patient_id, self._parking_position(self.active_index), (0, 0, 0, 1)
            )
        self.active_index = int(index)
        self._offset_xy_m = (float(offset[0]), float(offset[1]))
        self._yaw_deg = float(yaw_deg)
        self._place_active_patient()
        return self.patient_in_world

    def _place_active_patient(self) -> None:
        anchor_world = (self._offset_xy_m[0], self._offset_xy_m[1], self._table_height_m)
        self._patient_in_world = patient_in_world_matrix(
            self._anchors_mm[self.active_index], anchor_world, self._yaw_deg
        )
        position, quat = matrix_to_pose(self._patient_in_world)
        self.client.resetBasePositionAndOrientation(self.active_patient_id, position, quat)

    def set_table_height(self, height_m: float) -> None:
        """Raise or lower the table; the patient and the ultrasound arm move with it."""
        low, high = self.config.table_height_range_m
        if not (math.isfinite(height_m) and low <= height_m <= high):
            raise ValueError(f"table height must be in [{low}, {high}] m, got {height_m!r}")
        self._table_height_m = float(height_m)
        self.client.resetBasePositionAndOrientation(
            self.table_id, (0.0, 0.0, self._table_height_m), (0, 0, 0, 1)
        )
        self._place_active_patient()
        if self.probe_arm is not None:
            self.place_probe_arm(self.probe_arm_side)

    def reset(
        self,
        patient_index: int = 0,
        offset_xy_m: Sequence[float] = (0.0, 0.0),
        yaw_deg: float = 0.0,
        carm_joints=None,
    ) -> np.ndarray:
        """Activate a patient and home the C-arm (or set its joints); moves bodies only.

        Returns:
            The new ``patient_in_world``.
        """
        patient_in_world = self.set_active_patient(patient_index, offset_xy_m, yaw_deg)
        if self.carm is not None:
            self.carm.reset(carm_joints)
        return patient_in_world

    # ----- ultrasound arm -------------------------------------------------------------------

    def _probe_arm_base_pose(self, side: str):
        cfg = self.config
        sign = -1.0 if side == "left" else 1.0
        position = (
            cfg.probe_arm_x_m,
            sign * (cfg.table_width_m / 2 + cfg.probe_arm_gap_m),
            self._table_height_m - cfg.probe_arm_below_top_m,
        )
        # The base's x axis faces the table: +y from the left side, -y from the right.
        yaw_deg = -90.0 * sign
        quat = matrix_to_quat(rotation_about_axis((0.0, 0.0, 1.0), yaw_deg))
        return position, tuple(float(q) for q in quat)

    def place_probe_arm(self, side: str) -> None:
        """Move the ultrasound arm (and its stand) beside the table on the patient's ``side``."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        if self.probe_arm is None:
            raise RuntimeError("this scene has no ultrasound arm; build it with probe_arm=True")
        position, quat = self._probe_arm_base_pose(side)
        self.probe_arm.set_base_pose(position, quat)
        self.client.resetBasePositionAndOrientation(self.arm_stand_id, position, (0, 0, 0, 1))
        self.probe_arm_side = side

    # ----- collisions -----------------------------------------------------------------------

    def named_bodies(self) -> dict[str, int]:
        """Body ids by name: ``table``, ``patient`` (the active one), ``carm``, ``probe_arm``,
        ``arm_stand`` (those present)."""
        bodies = {"table": self.table_id, "patient": self.active_patient_id}
        if self.carm is not None:
            bodies["carm"] = self.carm.body_id
        if self.probe_arm is not None:
            bodies["probe_arm"] = self.probe_arm.body_id
            bodies["arm_stand"] = self.arm_stand_id
        return bodies

    def collisions(self, margin_m: float = 0.0) -> list[Collision]:
        """Link pairs of different named bodies closer than ``margin_m`` (0: touching).

        Cost: about 10 microseconds when nothing is near; PyBullet returns one point per
        skin triangle within the margin, so a device pressed into a 30 000-face skin
        costs some 20 ms, and a margin of more than a few centimetres costs more.

        Not reported: the patient on the table, and the ultrasound arm's base on its
        stand. The probe touching the skin is reported like any contact, also after
        ``ProbeArm.exclude_from_contacts`` (closest points ignore collision filters);
        its link name tells it apart.
        """
        if not (math.isfinite(margin_m) and margin_m >= 0.0):
            raise ValueError(f"margin_m must be a non-negative number, got {margin_m!r}")
        bodies = list(self.named_bodies().items())
        found: dict[tuple, float] = {}
        for i, (name_a, body_a) in enumerate(bodies):
            for name_b, body_b in bodies[i + 1 :]:
                if {name_a, name_b} == {"table", "patient"}:
                    continue
                for point in self.client.getClosestPoints(body_a, body_b, margin_m):
                    if (point[1], point[2]) != (body_a, body_b):
                        continue  # PyBullet pads long answers with zeroed entries
                    link_a, link_b, distance = point[3], point[4], point[8]
                    if {name_a, name_b} == {"probe_arm", "arm_stand"}:
                        arm_link = link_a if name_a == "probe_arm" else link_b
                        if arm_link == -1:
                            continue
                    key = (name_a, self._link_name(body_a, link_a), name_b)
                    key += (self._link_name(body_b, link_b),)
                    found[key] = min(distance, found.get(key, math.inf))
        return [Collision(*key, distance_m=d) for key, d in sorted(found.items())]

    def _link_name(self, body: int, link: int) -> str:
        names = self._link_names.get(body)
        if names is None:
            c = self.client
            names = {-1: c.getBodyInfo(body)[0].decode()}
            for j in range(c.getNumJoints(body)):
                names[j] = c.getJointInfo(body, j)[12].decode()
            self._link_names[body] = names
        return names.get(link, str(link))

    # ----- rendering and lifetime -----------------------------------------------------------

    def camera_image(
        self,
        eye_m: Sequence[float],
        target_m: Sequence[float],
        width: int = 640,
        height: int = 480,
        fov_deg: float = 45.0,
        up: Sequence[float] = (0.0, 0.0, 1.0),
        light_direction: Sequence[float] = (-0.6, -1.0, 2.0),
    ) -> np.ndarray:
        """RGB view of the scene, uint8 ``(height, width, 3)``, with the CPU renderer."""
        c = self.client
        view = c.computeViewMatrix(list(eye_m), list(target_m), list(up))
        projection = c.computeProjectionMatrixFOV(fov_deg, width / height, 0.05, 20.0)
        _, _, rgba, _, _ = c.getCameraImage(
            width,
            height,
            view,
            projection,
            renderer=c.ER_TINY_RENDERER,
            lightDirection=list(light_direction),
            shadow=1,
            lightAmbientCoeff=0.55,
            lightDiffuseCoeff=0.5,
            lightSpecularCoeff=0.05,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3]

    def close(self) -> None:
        """Disconnect the client; the scene is unusable afterwards. Safe to call twice."""
        client, self.client = getattr(self, "client", None), None
        if client is not None:
            client.disconnect()

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _posterior_anchor_mm(patient: Patient) -> np.ndarray:
    """Patient point (mm) that rests on the table's centre: the middle of the skin's
    left-right and head-foot extent, at its most posterior point."""
    vertices = np.asarray(patient.skin_mesh.vertices)
    low, high = vertices.min(0), vertices.max(0)
    return np.array([(low[0] + high[0]) / 2, low[1], (low[2] + high[2]) / 2])

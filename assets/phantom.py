"""Procedural torso phantom: sonoray's embedded default patient.

``make_phantom(seed)`` builds a CT-like adult torso from the base of the neck to the
pelvis on a fixed 2 mm grid: skin, subcutaneous fat, a muscle wall with paraspinal
and psoas muscles, five lung lobes, heart, aorta, trachea, liver, spleen, kidneys,
stomach (with a gas-fluid level), vertebrae T1-L5, sacrum, 24 ribs with costal
cartilages, sternum and both hip bones. Structure names and label ids are those of
TotalSegmentator's ``total`` task (v2 class map), so tasks written for a labelled
real CT run unchanged on the phantom. Body size, fat, organ volumes and positions
and the CT noise are drawn from published adult ranges by the seed; every phantom
shares one grid (``PHANTOM_SHAPE``, ``PHANTOM_SPACING_MM``, ``phantom_affine()``) so
their volumes batch.

Main references: vertebral levels and organ relations as in Gray's Anatomy (42nd ed.);
vertebral body sizes after Panjabi et al., Spine 1991 (thoracic) and 1992 (lumbar);
trunk breadth and depth after the ANSUR II anthropometric survey (Gordon et al. 2014);
CT numbers from ``sonoray.assets.tissues``. Numbers marked (approx.) are rounded
teaching values, not fits.

Limitations:
    Organs are smooth analytic solids (ellipsoids, swept tubes, planes, dome-shaped
    shells), so contours are simpler than real anatomy; lung fissures are planes. The
    spine is straight in the frontal plane and its vertebrae are not tilted. There are
    no arms, clavicles, scapulae, femora, pancreas, gallbladder, bowel gas, veins or
    vessels inside the lungs; the neck is a short stub cut flat at its top; costal
    cartilages carry HU but no label. The abdominal cavity's free space is a random
    mixture of bowel (soft tissue) and visceral fat. CT noise is white and Gaussian (no
    streaks or correlated texture). Bones are a cortical shell (at least one voxel)
    over a cancellous core, so thin bones are mostly cortex at 2 mm. Organ volumes hit
    their targets within about 2 % unless a large organ does not fit a small body, in
    which case a warning says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage, special

from sonoray.assets import tissues
from sonoray.assets.patient import Patient

log = logging.getLogger(__name__)

#: Voxel size of every phantom (mm, isotropic).
PHANTOM_SPACING_MM = 2.0
#: Grid shape of every phantom along (x right, y anterior, z superior): 464 x 336 x 720 mm,
#: which holds the largest allowed body with at least 10 mm of air around it.
PHANTOM_SHAPE: tuple[int, int, int] = (232, 168, 360)

#: Structure ids (TotalSegmentator ``total`` task, v2 class map) -> names.
PHANTOM_LABELS: dict[int, str] = {
    1: "spleen",
    2: "kidney_right",
    3: "kidney_left",
    5: "liver",
    6: "stomach",
    10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right",
    13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right",
    16: "trachea",
    25: "sacrum",
    **{27 + i: f"vertebrae_L{5 - i}" for i in range(5)},
    **{32 + i: f"vertebrae_T{12 - i}" for i in range(12)},
    51: "heart",
    52: "aorta",
    77: "hip_left",
    78: "hip_right",
    86: "autochthon_left",
    87: "autochthon_right",
    88: "iliopsoas_left",
    89: "iliopsoas_right",
    **{91 + k: f"rib_left_{k}" for k in range(1, 13)},
    **{103 + k: f"rib_right_{k}" for k in range(1, 13)},
    116: "sternum",
}
_ID = {name: i for i, name in PHANTOM_LABELS.items()}

# Random streams derived from the seed (numpy SeedSequence spawn keys).
_STREAM_PARAMS, _STREAM_TEXTURE, _STREAM_NOISE = 0, 1, 2


# ----- parameters ---------------------------------------------------------------------------


def _param(default: float, allowed: tuple[float, float], doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"range": allowed, "doc": doc})


@dataclass(frozen=True)
class PhantomParams:
    """Size, organ and noise parameters of one phantom, each within an adult range.

    Ranges (``PhantomParams.ranges()``) are adult values: trunk sizes after ANSUR II
    (approx., lean of subcutaneous fat), organ volumes after CT volumetry reviews
    (liver 1-2.5 L, kidney 100-250 mL, spleen 100-300 mL, heart with blood 500-900 mL).
    Out-of-range or non-numeric values raise ``ValueError``.

    Attributes:
        torso_height_mm: Top of the T1 vertebral body to the bottom of the body (below
            the ischial tuberosities); vertebrae and organ levels scale with it.
        trunk_width_mm: Left-right width of the lower chest outside the muscle wall; the
            skin width adds twice ``fat_thickness_mm``.
        trunk_depth_mm: Anterior-posterior depth of the lower chest outside the muscle wall.
        fat_thickness_mm: Subcutaneous fat at the flanks (x1.4 over the lower abdomen,
            x0.7 over the back).
        visceral_fat_fraction: Fraction of the free abdominal cavity that is fat (the rest
            is bowel, as soft tissue).
        liver_volume_ml: Target liver volume.
        spleen_volume_ml: Target spleen volume.
        kidney_left_volume_ml: Target left kidney volume.
        kidney_right_volume_ml: Target right kidney volume.
        heart_volume_ml: Target heart volume including the blood in its chambers.
        stomach_volume_ml: Target stomach volume (wall and contents).
        stomach_gas_fraction: Fraction of the stomach's lumen filled with gas, which
            floats anteriorly (the patient lies supine).
        diaphragm_shift_mm: Superior shift of the diaphragm and of the organs under it.
        heart_shift_left_mm: Shift of the heart towards the patient's left.
        kidney_left_shift_mm: Superior shift of the left kidney from its typical level
            (hilum at L1-L2).
        kidney_right_drop_mm: How much lower the right kidney lies than the left.
        hu_noise_std_hu: Standard deviation of the white Gaussian CT noise in the body.
    """

    torso_height_mm: float = _param(590.0, (500.0, 650.0), "T1 top to body bottom")
    trunk_width_mm: float = _param(300.0, (250.0, 330.0), "lean chest width")
    trunk_depth_mm: float = _param(200.0, (170.0, 230.0), "lean chest depth")
    fat_thickness_mm: float = _param(15.0, (3.0, 35.0), "subcutaneous fat at the flanks")
    visceral_fat_fraction: float = _param(0.3, (0.05, 0.6), "fat share of the abdomen")
    liver_volume_ml: float = _param(1600.0, (1100.0, 2300.0), "liver volume")
    spleen_volume_ml: float = _param(180.0, (100.0, 300.0), "spleen volume")
    kidney_left_volume_ml: float = _param(160.0, (110.0, 230.0), "left kidney volume")
    kidney_right_volume_ml: float = _param(155.0, (110.0, 230.0), "right kidney volume")
    heart_volume_ml: float = _param(700.0, (500.0, 900.0), "heart volume with blood")
    stomach_volume_ml: float = _param(300.0, (150.0, 600.0), "stomach volume")
    stomach_gas_fraction: float = _param(0.15, (0.0, 0.4), "gas share of the stomach lumen")
    diaphragm_shift_mm: float = _param(0.0, (-20.0, 20.0), "superior diaphragm shift")
    heart_shift_left_mm: float = _param(0.0, (-15.0, 15.0), "heart shift to the left")
    kidney_left_shift_mm: float = _param(0.0, (-15.0, 15.0), "superior left kidney shift")
    kidney_right_drop_mm: float = _param(15.0, (0.0, 35.0), "right kidney below left")
    hu_noise_std_hu: float = _param(10.0, (0.0, 30.0), "CT noise standard deviation")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low, high = f.metadata["range"]
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ValueError(
                    f"phantom parameter {f.name}={value!r} is not a number; "
                    f"allowed range [{low}, {high}]"
                )
            if not (low <= float(value) <= high):
                raise ValueError(
                    f"phantom parameter {f.name}={value!r} is outside the allowed adult "
                    f"range [{low}, {high}]"
                )
            object.__setattr__(self, f.name, float(value))

    @staticmethod
    def ranges() -> dict[str, tuple[float, float]]:
        """Allowed (low, high) of every parameter, in the field's unit."""
        return {f.name: f.metadata["range"] for f in dataclasses.fields(PhantomParams)}


def sample_phantom_params(seed: int) -> PhantomParams:
    """Draw a plausible adult from the seed (same seed, same parameters, in any process).

    Body sizes share one size factor so that tall patients tend to be broad and to have
    larger organs; each value is clipped into its allowed range.
    """
    rng = np.random.default_rng(
        np.random.SeedSequence(_check_seed(seed), spawn_key=(_STREAM_PARAMS,))
    )
    size = float(np.clip(rng.normal(), -2.0, 2.0))
    n = rng.normal(size=12)
    u = rng.uniform(size=7)
    lean = 1.0 + 0.06 * size
    draws = {
        "torso_height_mm": 585.0 + 28.0 * size + 10.0 * n[0],
        "trunk_width_mm": 292.0 + 16.0 * size + 8.0 * n[1],
        "trunk_depth_mm": 198.0 + 12.0 * size + 7.0 * n[2],
        "fat_thickness_mm": 5.0 + 27.0 * u[0],
        "visceral_fat_fraction": 0.1 + 0.4 * u[1],
        "liver_volume_ml": 1600.0 * lean**3 * math.exp(0.12 * n[3]),
        "spleen_volume_ml": 180.0 * lean**3 * math.exp(0.2 * n[4]),
        "kidney_left_volume_ml": 160.0 * lean**3 * math.exp(0.12 * n[5]),
        "kidney_right_volume_ml": 155.0 * lean**3 * math.exp(0.12 * n[6]),
        "heart_volume_ml": 700.0 * lean**3 * math.exp(0.1 * n[7]),
        "stomach_volume_ml": 200.0 + 250.0 * u[2],
        "stomach_gas_fraction": 0.05 + 0.25 * u[3],
        "diaphragm_shift_mm": 8.0 * n[8],
        "heart_shift_left_mm": 5.0 * n[9],
        "kidney_left_shift_mm": 6.0 * n[10],
        "kidney_right_drop_mm": 8.0 + 20.0 * u[4],
        "hu_noise_std_hu": 5.0 + 15.0 * u[5],
    }
    ranges = PhantomParams.ranges()
    return PhantomParams(**{k: float(np.clip(v, *ranges[k])) for k, v in draws.items()})


def phantom_affine() -> np.ndarray:
    """Voxel -> patient RAS mm affine shared by every phantom (grid centred on the origin)."""
    affine = np.diag([PHANTOM_SPACING_MM] * 3 + [1.0])
    affine[:3, 3] = -0.5 * PHANTOM_SPACING_MM * (np.array(PHANTOM_SHAPE) - 1)
    return affine


def make_phantom(seed: int, params: PhantomParams | None = None, **overrides: float) -> Patient:
    """Build procedural phantom ``seed``.

    Args:
        seed: Non-negative integer; it draws the parameters (unless ``params`` is given),
            the abdominal texture and the CT noise.
        params: Parameters to use instead of ``sample_phantom_params(seed)``.
        **overrides: Parameter values replacing those drawn or given, e.g.
            ``make_phantom(3, hu_noise_std_hu=0)``.

    Returns:
        A :class:`Patient` named ``phantom-<seed>`` whose ``meta`` holds ``seed`` and
        ``params`` (a dict that ``PhantomParams(**meta["params"])`` rebuilds).

    Raises:
        ValueError: for a negative or non-integer seed, an unknown parameter name or a
            value outside its allowed range.

    Warns:
        UserWarning: when an organ cannot reach its target volume in this body (a large
            organ in a small trunk); the organ is then as large as fits.
    """
    start = time.perf_counter()
    seed = _check_seed(seed)
    if params is None:
        params = sample_phantom_params(seed)
    elif not isinstance(params, PhantomParams):
        raise ValueError(f"params must be a PhantomParams or None, got {type(params).__name__}")
    unknown = sorted(set(overrides) - set(PhantomParams.ranges()))
    if unknown:
        raise ValueError(
            f"unknown phantom parameter(s) {unknown}; allowed: {sorted(PhantomParams.ranges())}"
        )
    params = dataclasses.replace(params, **overrides)

    hu, labels, body = _Builder(params, seed).build()
    log.debug("built phantom %d in %.2f s", seed, time.perf_counter() - start)
    present = set(np.flatnonzero(np.bincount(labels.ravel())).tolist())
    return Patient(
        name=f"phantom-{seed:04d}",
        hu=hu,
        labels=labels,
        label_names={i: n for i, n in PHANTOM_LABELS.items() if i in present},
        affine=phantom_affine(),
        body_mask=body,
        meta={
            "source": "sonoray procedural phantom",
            "seed": seed,
            "params": dataclasses.asdict(params),
        },
    )


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"phantom seed must be a non-negative integer, got {seed!r}")
    return int(seed)


# ----- reference anatomy (a 590 mm torso, 300 x 200 mm lean chest) -------------------------

_REF_HEIGHT_MM = 590.0
_REF_WIDTH_MM = 300.0
_REF_DEPTH_MM = 200.0
_NECK_MM = 45.0  # neck stub above the top of T1 (not scaled)

_VERTEBRAE = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))
# Height of each vertebra plus the disc below it (mm) [Panjabi 1991/1992, approx.].
_SEGMENT_MM = (20, 20, 21, 21, 22, 22, 23, 23, 24, 25, 26, 27, 33, 34, 35, 35, 35)
# Vertebral body width and depth (mm) at vertebra index knots [Panjabi 1991/1992, approx.].
_VB_KNOTS = (0, 3, 7, 11, 12, 16)
_VB_WIDTH_MM = (28, 30, 34, 42, 44, 50)
_VB_DEPTH_MM = (16, 22, 26, 30, 32, 35)

# Trunk outline: level below the top of T1 (mm, reference torso, increasing), width and
# depth factors relative to the lower chest. Above _SHOULDER_ZR the outline closes in a cap.
_OUTLINE_ZR = (-590.0, -570.0, -480.0, -410.0, -360.0, -300.0, -230.0, -150.0, -80.0, -20.0)
_OUTLINE_W = (1.02, 1.02, 1.04, 0.97, 0.90, 0.93, 1.00, 1.00, 1.02, 1.04)
_OUTLINE_D = (0.88, 0.88, 0.92, 0.95, 0.95, 0.97, 1.00, 1.00, 0.92, 0.78)
_SHOULDER_ZR, _SHOULDER_CAP = -50.0, 78.0  # the outline closes over the shoulders
_APEX_ZR, _APEX_CAP = -110.0, 120.0  # the cavity narrows to the lung apices
_BOTTOM_ROUND_ZR = -570.0

# HU of tissues that the tissue table does not list: cartilage and disc sit at the top
# of the soft-tissue range (approx.).
_HU = {t.name: float(t.hu_mean) for t in tissues.TISSUES}
_HU_CARTILAGE = float(tissues.tissue("soft_tissue").hu_range[1])
_LUNG_GRADIENT_HU = 30.0  # dependent (posterior) lung is denser when supine (approx.)


class _Box(NamedTuple):
    """A box of voxels: its slices into the grid and its coordinates (mm), broadcastable."""

    sl: tuple[slice, slice, slice]
    x: np.ndarray  # (nx, 1, 1)
    y: np.ndarray  # (1, ny, 1)
    z: np.ndarray  # (1, 1, nz)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])

    def within(self, outer: _Box) -> tuple[slice, ...]:
        return tuple(
            slice(s.start - o.start, s.stop - o.start)
            for s, o in zip(self.sl, outer.sl, strict=True)
        )


class _Part(NamedTuple):
    box: _Box
    outer: np.ndarray  # bool, box shape
    core: np.ndarray | None  # bool, box shape: the cancellous core of a bone


class _Grid:
    """The phantom grid in trunk coordinates (mm): x right, y anterior, z superior."""

    def __init__(self, y_offset_mm: float):
        h = PHANTOM_SPACING_MM
        origin = phantom_affine()[:3, 3]
        self.axes = [
            (origin[d] + h * np.arange(n) - (y_offset_mm if d == 1 else 0.0)).astype(np.float32)
            for d, n in enumerate(PHANTOM_SHAPE)
        ]

    def box_index(self, lo: Any, hi: Any) -> _Box:
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        x, y, z = (ax[s] for ax, s in zip(self.axes, sl, strict=True))
        return _Box(sl, x[:, None, None], y[None, :, None], z[None, None, :])

    def box(self, lo_mm: Any, hi_mm: Any) -> _Box | None:
        """Voxels whose centres lie in [lo_mm, hi_mm]; None if there are none."""
        lo, hi = [], []
        for ax, a, b in zip(self.axes, lo_mm, hi_mm, strict=True):
            i0 = max(0, math.ceil((a - ax[0]) / PHANTOM_SPACING_MM))
            i1 = min(len(ax), math.floor((b - ax[0]) / PHANTOM_SPACING_MM) + 1)
            if i1 <= i0:
                return None
            lo.append(i0)
            hi.append(i1)
        return self.box_index(lo, hi)

    def full(self) -> _Box:
        return self.box_index((0, 0, 0), PHANTOM_SHAPE)


def _cap(t: np.ndarray, h: float) -> np.ndarray:
    """Elliptic roll-off: 1 for t <= 0, falling to 0 at t = h."""
    return np.sqrt(np.clip(1.0 - (np.maximum(t, 0.0) / h) ** 2, 0.0, 1.0))


def _unit(v: Any) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def _frame(long_axis: Any, hint: Any) -> np.ndarray:
    """3 x 3 matrix whose columns are the unit long axis and two perpendiculars."""
    e0 = _unit(long_axis)
    e1 = _unit(np.asarray(hint, dtype=float) - np.dot(hint, e0) * e0)
    return np.stack([e0, e1, np.cross(e0, e1)], axis=1)


def _ellipsoid(
    grid: _Grid, centre: Any, semi: Any, axes: np.ndarray | None = None, shell_mm: float = 0.0
) -> _Part | None:
    """Solid ellipsoid with semi-axes ``semi`` along the columns of ``axes``."""
    c = np.asarray(centre, dtype=float)
    semi = np.asarray(semi, dtype=float)
    rot = np.eye(3) if axes is None else np.asarray(axes, dtype=float)
    extent = np.sqrt(((rot * semi[None, :]) ** 2).sum(axis=1))
    box = grid.box(c - extent, c + extent)
    if box is None:
        return None
    core = _ellipsoid_mask(box, c, semi - shell_mm, rot) if shell_mm > 0 else None
    return _Part(box, _ellipsoid_mask(box, c, semi, rot), core)


def _ellipsoid_mask(box: _Box, centre: Any, semi: Any, rot: np.ndarray) -> np.ndarray:
    """Voxels of ``box`` inside an ellipsoid (semi-axes along the columns of ``rot``)."""
    # Python floats keep the float32 coordinates float32.
    cx, cy, cz = (float(v) for v in centre)
    d = (box.x - cx, box.y - cy, box.z - cz)
    q = 0.0
    for k in range(3):
        wx, wy, wz = (np.asarray(rot, dtype=float)[:, k] / float(semi[k])).tolist()
        u = (d[0] * wx + d[1] * wy) + d[2] * wz
        q = q + u * u
    return q <= 1.0


def _sweep(
    grid: _Grid, points: Any, semi_u: Any, semi_v: Any, up: Any, shell_mm: float = 0.0
) -> list[_Part]:
    """Tube of elliptic cross-section along a polyline, one part per segment.

    Args:
        points: (N, 3) centreline (mm).
        semi_u, semi_v: (N,) semi-axes of the cross-section along ``up`` and across it.
        up: (3,) or (N, 3) direction of the ``semi_u`` axis (made perpendicular per segment).
        shell_mm: Cortical shell thickness; > 0 also returns the core.
    """
    p = np.asarray(points, dtype=float)
    su = np.broadcast_to(np.asarray(semi_u, dtype=float), len(p))
    sv = np.broadcast_to(np.asarray(semi_v, dtype=float), len(p))
    ups = np.broadcast_to(np.asarray(up, dtype=float), p.shape)
    parts = []
    for i in range(len(p) - 1):
        a, b = p[i], p[i + 1]
        length = float(np.linalg.norm(b - a))
        if length < 1e-6:
            continue
        t_axis = (b - a) / length
        u_axis = ups[i] - np.dot(ups[i], t_axis) * t_axis
        if np.linalg.norm(u_axis) < 1e-6:
            u_axis = np.cross(t_axis, [1.0, 0.0, 0.0])
        u_axis = _unit(u_axis)
        v_axis = np.cross(t_axis, u_axis)
        r = max(su[i], su[i + 1], sv[i], sv[i + 1])
        box = grid.box(np.minimum(a, b) - r, np.maximum(a, b) + r)
        if box is None:
            continue
        ax, ay, az = a.tolist()
        tx, ty, tz = t_axis.tolist()
        ux, uy, uz = u_axis.tolist()
        vx, vy, vz = v_axis.tolist()
        d = (box.x - ax, box.y - ay, box.z - az)
        s = (d[0] * tx + d[1] * ty) + d[2] * tz
        t = np.clip(s * (1.0 / length), 0.0, 1.0)
        along = s - t * length
        across_u = (d[0] * ux + d[1] * uy) + d[2] * uz
        across_v = (d[0] * vx + d[1] * vy) + d[2] * vz
        su0, su1, sv0, sv1 = float(su[i]), float(su[i + 1]), float(sv[i]), float(sv[i + 1])
        su_t = su0 + (su1 - su0) * t
        sv_t = sv0 + (sv1 - sv0) * t

        def inside(
            du: float, su_t=su_t, sv_t=sv_t, across_u=across_u, across_v=across_v, along=along
        ) -> np.ndarray:
            a_u, a_v = su_t - du, sv_t - du
            return (across_u / a_u) ** 2 + (across_v / a_v) ** 2 + (
                along / np.minimum(a_u, a_v)
            ) ** 2 <= 1.0

        parts.append(_Part(box, inside(0.0), inside(shell_mm) if shell_mm > 0 else None))
    return parts


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], step: int, sigma: float
) -> np.ndarray:
    """Smooth Gaussian random field with unit variance (float32, ``shape``).

    White noise on a grid ``step`` voxels apart is interpolated with Gaussian weights
    (``sigma`` in coarse cells), one axis at a time as matrix products.
    """
    n_coarse = [n // step + 3 for n in shape]
    field = rng.standard_normal(n_coarse, dtype=np.float32)
    for n, m in zip(shape, n_coarse, strict=True):
        fine = np.arange(n) / step + 1.0
        w = np.exp(-0.5 * ((fine[:, None] - np.arange(m)[None, :]) / sigma) ** 2)
        w /= np.sqrt((w**2).sum(axis=1, keepdims=True))  # keep unit variance
        # Contract the leading (coarse) axis and append the fine one: x, y, z in turn.
        field = np.tensordot(field, w.astype(np.float32), axes=([0], [1]))
    return np.ascontiguousarray(field)


def _merge(grid: _Grid, parts: list[_Part | None]) -> _Part | None:
    """Union of parts on their common box (cores are unioned separately)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    lo = [min(p.box.sl[d].start for p in parts) for d in range(3)]
    hi = [max(p.box.sl[d].stop for p in parts) for d in range(3)]
    box = grid.box_index(lo, hi)
    outer = np.zeros(box.shape, dtype=bool)
    core = np.zeros(box.shape, dtype=bool) if any(p.core is not None for p in parts) else None
    for p in parts:
        sl = p.box.within(box)
        outer[sl] |= p.outer
        if p.core is not None:
            core[sl] |= p.core
    return _Part(box, outer, core)


def _under(value: Any, mask: np.ndarray) -> Any:
    """A scalar as is, or the values of a box-broadcastable array under ``mask``."""
    return value if np.ndim(value) == 0 else np.broadcast_to(value, mask.shape)[mask]


def _erode(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` whose six face neighbours are all in it (the box's faces are out)."""
    out = np.zeros_like(mask)
    inner = (slice(1, -1),) * 3
    out[inner] = mask[inner]
    for axis in range(3):
        for step in (-1, 1):
            out[inner] &= np.roll(mask, step, axis=axis)[inner]
    return out


def _column(box: _Box, centre_x: Any, centre_y: Any, semi_x: Any, semi_y: Any) -> np.ndarray:
    """Voxels of ``box`` inside an elliptic column; each argument a scalar or one value per z."""

    def per_z(v: Any) -> Any:
        return np.asarray(v, dtype=np.float32).reshape(1, 1, -1) if np.ndim(v) else float(v)

    cx, cy, sx, sy = (per_z(v) for v in (centre_x, centre_y, semi_x, semi_y))
    return ((box.x - cx) / sx) ** 2 + ((box.y - cy) / sy) ** 2 <= 1.0


class _Canvas:
    """HU and label volumes that structures are painted into, later over earlier."""

    def __init__(self) -> None:
        self.hu = np.full(PHANTOM_SHAPE, _HU["air"], dtype=np.float32)
        self.labels = np.zeros(PHANTOM_SHAPE, dtype=np.int16)

    def free(self, box: _Box) -> np.ndarray:
        return self.labels[box.sl] == 0

    def paint(
        self, box: _Box, mask: np.ndarray, hu: Any, label: Any = 0, only_free: bool = False
    ) -> np.ndarray:
        """Set HU and label (scalars or arrays broadcastable to the box) under ``mask``."""
        if only_free:
            mask = mask & self.free(box)
        self.hu[box.sl][mask] = _under(hu, mask)
        if np.ndim(label) or label:
            self.labels[box.sl][mask] = _under(label, mask)
        return mask

    def paint_bone(self, part: _Part | None, label: int) -> None:
        """Cortical bone under ``outer``; cancellous bone in the core, at least one voxel in."""
        if part is None:
            return
        self.paint(part.box, part.outer, _HU["cortical_bone"], label)
        if part.core is not None:
            self.paint(part.box, part.core & _erode(part.outer), _HU["cancellous_bone"])


class _Builder:
    """Lays out one phantom's anatomy from its parameters and paints it, organ by organ."""

    def __init__(self, params: PhantomParams, seed: int):
        self.p = params
        self.seed = seed
        self.s_z = params.torso_height_mm / _REF_HEIGHT_MM
        self.s_w = params.trunk_width_mm / _REF_WIDTH_MM
        self.s_d = params.trunk_depth_mm / _REF_DEPTH_MM
        # Top of T1 such that the body (neck stub to bottom) is centred on z = 0.
        self.z_t1 = 0.5 * (params.torso_height_mm - _NECK_MM)
        self._vertebra_levels()
        # Patient y = trunk y + y_offset, which centres the body in the grid's y range.
        zs = np.linspace(self.z_t1 - params.torso_height_mm, self.z_t1, 300)
        o = self.outline(zs)
        self.y_offset = 0.5 * (o["skin"][2].max() - o["skin"][1].max())
        self.grid = _Grid(self.y_offset)
        self.canvas = _Canvas()
        self.voxel_ml = PHANTOM_SPACING_MM**3 / 1000.0

    # ----- levels and outlines ----------------------------------------------------------

    def z_at(self, zr: Any) -> Any:
        """Patient z of a reference level (mm below the top of T1 in the reference torso)."""
        return self.z_t1 + self.s_z * np.asarray(zr, dtype=float)

    def _vertebra_levels(self) -> None:
        top = self.z_t1
        self.vertebra: dict[str, dict[str, float]] = {}
        idx = np.arange(len(_VERTEBRAE))
        width = np.interp(idx, _VB_KNOTS, _VB_WIDTH_MM) * self.s_z
        depth = np.interp(idx, _VB_KNOTS, _VB_DEPTH_MM) * self.s_z
        for i, (name, seg) in enumerate(zip(_VERTEBRAE, _SEGMENT_MM, strict=True)):
            seg = seg * self.s_z
            disc = seg * (0.25 if name.startswith("L") else 0.18)
            self.vertebra[name] = {
                "top": top,
                "bottom": top - seg + disc,
                "a": 0.5 * width[i],
                "b": 0.5 * depth[i],
            }
            top -= seg
        self.z_s1 = top  # top of the sacrum

    def outline(self, z: Any) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Half-width, anterior and posterior half-depth (mm) of skin, lean and cavity at z."""
        p = self.p
        shape = np.shape(z)
        z = np.atleast_1d(np.asarray(z, dtype=float))
        zr = (z - self.z_t1) / self.s_z
        wf = np.interp(zr, _OUTLINE_ZR, _OUTLINE_W)
        df = np.interp(zr, _OUTLINE_ZR, _OUTLINE_D)
        bottom = _cap(_BOTTOM_ROUND_ZR - zr, 20.0)
        cap_w = _cap(zr - _SHOULDER_ZR, _SHOULDER_CAP) * bottom
        cap_d = np.sqrt(cap_w)
        a0 = 0.5 * p.trunk_width_mm * wf
        b_ant0 = 0.55 * p.trunk_depth_mm * df
        b_post0 = 0.45 * p.trunk_depth_mm * df
        fat = p.fat_thickness_mm
        fat_ant = fat * np.interp(zr, (-260.0, -200.0), (1.4, 1.0))
        wall_lat = np.interp(zr, (-470.0, -390.0), (45.0, 14.0))
        wall_post = np.interp(zr, (-470.0, -390.0), (45.0, 22.0))
        cap_cav = _cap(-535.0 - zr, 25.0) * _cap(zr - _APEX_ZR, _APEX_CAP)
        layers = {
            "skin": ((a0 + fat) * cap_w, (b_ant0 + fat_ant) * cap_d, (b_post0 + 0.7 * fat) * cap_d),
            "lean": (a0 * cap_w, b_ant0 * cap_d, b_post0 * cap_d),
            "cavity": (
                np.maximum(a0 - wall_lat, 0.0) * cap_w * cap_cav,
                np.maximum(b_ant0 - 14.0, 0.0) * cap_d * cap_cav,
                np.maximum(b_post0 - wall_post, 0.0) * cap_d * cap_cav,
            ),
        }
        return {k: tuple(h.reshape(shape) for h in v) for k, v in layers.items()}

    def spine_y(self, z: Any) -> np.ndarray:
        """y of the vertebral body centres at z: a fixed depth in front of the lean back."""
        zr = (np.asarray(z, dtype=float) - self.z_t1) / self.s_z
        depth = np.interp(zr, (-446.0, -350.0, -274.0, -100.0, 0.0), (74.0, 76.0, 64.0, 60.0, 52.0))
        return -self.outline(z)["lean"][2] + depth * self.s_d

    def vb_size(self, z: Any) -> tuple[np.ndarray, np.ndarray]:
        """Vertebral body half-width and half-depth at z (interpolated between levels)."""
        zc = [0.5 * (v["top"] + v["bottom"]) for v in self.vertebra.values()][::-1]
        a = [v["a"] for v in self.vertebra.values()][::-1]
        b = [v["b"] for v in self.vertebra.values()][::-1]
        return np.interp(z, zc, a), np.interp(z, zc, b)

    def diaphragm_z(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """z of the diaphragm's upper surface over (x, y): two domes, lower behind."""
        dome_right = float(self.z_at(-185.0)) + self.p.diaphragm_shift_mm
        dome_left = float(self.z_at(-200.0)) + self.p.diaphragm_shift_mm
        a, b_ant, b_post = (float(h) for h in self.outline(dome_right)["cavity"])
        u = x / a
        v = np.where(y >= 0, y / b_ant, y / b_post)
        k_y = np.where(v < 0.05, 85.0, 50.0) * self.s_z
        k_x = 70.0 * self.s_z
        right = dome_right - k_x * (u - 0.5) ** 2 - k_y * (v - 0.05) ** 2
        left = dome_left - k_x * (u + 0.5) ** 2 - k_y * (v - 0.05) ** 2
        return np.maximum(right, left).astype(np.float32)

    # ----- painting ---------------------------------------------------------------------

    def build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.paint_body()
        self.paint_spine_soft_parts()
        self.paint_back_muscles()
        self.paint_heart_and_vessels()
        self.paint_lungs()
        self.paint_abdominal_organs()
        self.paint_bones()
        self.add_noise()
        return self.canvas.hu, self.canvas.labels, self.body

    def _inside_outline(self, box: _Box, half: tuple[np.ndarray, ...]) -> np.ndarray:
        """Voxels of box inside the egg-shaped outline given per z of the box."""
        a, b_ant, b_post = (np.asarray(h, dtype=np.float32) for h in half)
        valid = (a > 0) & (b_ant > 0) & (b_post > 0)
        with np.errstate(divide="ignore"):
            inv_a2 = np.where(valid, 1.0 / np.maximum(a, 1e-3) ** 2, 0.0).astype(np.float32)
            inv_b2 = np.where(
                box.y[0, :, :] >= 0,
                1.0 / np.maximum(b_ant, 1e-3) ** 2,
                1.0 / np.maximum(b_post, 1e-3) ** 2,
            ).astype(np.float32)
        x2 = box.x[:, :, 0] ** 2 * inv_a2[None, :] + np.where(valid, 0.0, 2.0).astype(np.float32)
        y2 = box.y[0, :, :] ** 2 * inv_b2  # (ny, nz)
        return (x2[:, None, :] + y2[None, :, :]) <= 1.0

    def paint_body(self) -> None:
        """Skin, subcutaneous fat, muscle wall, neck stub and the cavity's fill."""
        full = self.grid.full()
        c = self.canvas
        o = self.outline(full.z[0, 0])
        skin = o["skin"]
        self.body = self._inside_outline(full, skin)
        inner_skin = tuple(np.maximum(h - PHANTOM_SPACING_MM, 0.0) for h in skin)
        c.hu[self.body] = _HU["skin"]
        c.hu[self._inside_outline(full, inner_skin)] = _HU["fat"]
        self.lean = self._inside_outline(full, o["lean"])
        c.hu[self.lean] = _HU["muscle"]
        self.cavity = self._inside_outline(full, o["cavity"])
        # Behind the front of the vertebral bodies the midline is spine and back muscle.
        box = self.grid.box((-90.0, -300.0, self.z_s1), (90.0, 300.0, self.z_t1 + 40.0))
        a_vb, b_vb = self.vb_size(box.z[0, 0])
        y_vb = self.spine_y(box.z[0, 0])
        behind = (np.abs(box.x) < (a_vb + 12.0).astype(np.float32)) & (
            box.y < (y_vb + 0.3 * b_vb).astype(np.float32)
        )
        self.cavity[box.sl] &= ~behind
        self.paint_neck()

        # Thorax above the diaphragm holds mediastinal fat (lungs come later); below it,
        # bowel and visceral fat; the diaphragm itself is a few mm of muscle.
        self.z_dia = self.diaphragm_z(full.x[:, :, 0], full.y[:, :, 0])  # (nx, ny)
        z = full.z
        above = z > self.z_dia[:, :, None] + 2.0
        below = z < self.z_dia[:, :, None] - 2.0
        c.hu[self.cavity & above] = _HU["fat"]
        self.abdomen = self.cavity & below
        self.paint_abdominal_fill()

    def paint_neck(self) -> None:
        """An elliptic neck stub above the shoulders, closed flat at the top."""
        c = self.canvas
        top = self.z_t1 + _NECK_MM
        y_c = float(self.spine_y(self.z_t1)) + 12.0
        lean = np.array([46.0 * self.s_w, 50.0 * self.s_d])
        fat = 0.5 * self.p.fat_thickness_mm
        skin = lean + fat + PHANTOM_SPACING_MM
        box = self.grid.box(
            (-skin[0], y_c - skin[1], self.z_t1 - 10.0), (skin[0], y_c + skin[1], top)
        )
        outside = ~self.body[box.sl]  # the torso keeps its own layers
        for name, semi in (("skin", skin), ("fat", lean + fat), ("muscle", lean)):
            neck = np.broadcast_to(_column(box, 0.0, y_c, *semi), box.shape) & outside
            if name == "skin":
                self.body[box.sl] |= neck
            c.paint(box, neck, _HU[name])

    def paint_abdominal_fill(self) -> None:
        """Bowel (soft tissue) and visceral fat as smooth random blobs of about 3 cm."""
        idx = np.argwhere(self.abdomen.any(axis=(0, 1)))
        if len(idx) == 0:
            return
        ii = np.argwhere(self.abdomen.any(axis=(1, 2)))
        jj = np.argwhere(self.abdomen.any(axis=(0, 2)))
        box = self.grid.box_index(
            (ii.min(), jj.min(), idx.min()), (ii.max() + 1, jj.max() + 1, idx.max() + 1)
        )
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_STREAM_TEXTURE,)))
        field = _smooth_field(rng, box.shape, step=8, sigma=0.6)
        fat = field < float(special.ndtri(self.p.visceral_fat_fraction))
        hu = np.where(fat, np.float32(_HU["fat"]), np.float32(_HU["soft_tissue"]))
        self.canvas.paint(box, self.abdomen[box.sl], hu)

    def paint_spine_soft_parts(self) -> None:
        """Intervertebral discs (a column the bodies overwrite) and the spinal canal."""
        top = self.vertebra["T1"]["top"]
        bottom = self.z_s1
        box = self.grid.box((-40.0, -250.0, bottom), (40.0, 250.0, top))
        z = box.z[0, 0]
        y_vb = self.spine_y(z)
        a, b = self.vb_size(z)
        self.canvas.paint(box, _column(box, 0.0, y_vb, a, b), _HU_CARTILAGE)
        lumbar = z < self.vertebra["L1"]["top"]
        rc_x = np.where(lumbar, 11.0, 8.0) * self.s_z
        rc_y = np.where(lumbar, 8.5, 7.5) * self.s_z
        canal = _column(box, 0.0, y_vb - b - rc_y - 1.0, rc_x, rc_y)
        self.canvas.paint(box, canal, _HU["fluid"])

    def paint_back_muscles(self) -> None:
        """Autochthonous back muscles beside the spinous processes and the iliopsoas."""
        c = self.canvas
        box = self.grid.box((-120.0, -250.0, self.z_at(-480.0)), (120.0, 50.0, self.z_t1))
        zc = box.z[0, 0]
        y_vb = self.spine_y(zc)
        _, b = self.vb_size(zc)
        front = y_vb - b
        back = -self.outline(zc)["lean"][2]
        zr = (zc - self.z_t1) / self.s_z
        sx = np.interp(zr, (-446.0, -274.0, 0.0), (30.0, 26.0, 20.0)) * self.s_w
        sy = 0.5 * (front - back)
        yc = 0.5 * (front + back)
        for side, name in ((1.0, "autochthon_right"), (-1.0, "autochthon_left")):
            m = _column(box, side * (5.0 + sx), yc, sx, np.maximum(sy, 1.0))
            c.paint(box, m & self.lean[box.sl], _HU["muscle"], _ID[name])

        for side, name in ((1.0, "iliopsoas_right"), (-1.0, "iliopsoas_left")):
            part = _merge(self.grid, _sweep(self.grid, *self._psoas_path(side), up=(1, 0, 0)))
            c.paint(part.box, part.outer & self.lean[part.box.sl], _HU["muscle"], _ID[name])

    def _psoas_path(self, side: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        v = self.vertebra
        pts, su, sv = [], [], []
        for name, dx, dy, r_u, r_v in (
            ("T12", 8, 4, 6, 5),
            ("L1", 10, 4, 9, 7),
            ("L2", 14, 5, 13, 11),
            ("L3", 18, 6, 17, 14),
            ("L4", 22, 8, 20, 16),
            ("L5", 26, 12, 21, 17),
        ):
            z = 0.5 * (v[name]["top"] + v[name]["bottom"])
            pts.append((side * (v[name]["a"] + dx), float(self.spine_y(z)) + dy, z))
            su.append(r_u)
            sv.append(r_v)
        for zr, x, r_u, r_v in ((-480.0, 62.0, 20.0, 16.0), (-535.0, 75.0, 17.0, 14.0)):
            z = float(self.z_at(zr))
            b_ant = float(self.outline(z)["lean"][1])
            pts.append((side * x * self.s_w, b_ant - (80.0 if zr > -500 else 45.0) * self.s_d, z))
            su.append(r_u)
            sv.append(r_v)
        return np.array(pts), np.array(su) * self.s_w, np.array(sv) * self.s_d

    # ----- thorax -----------------------------------------------------------------------

    def _fit_volume(
        self, build: Callable[[float], _Part], target_ml: float, name: str, only_free: bool
    ) -> tuple[_Part, float]:
        """Scale an organ (``build(scale) -> _Part``) until its paintable volume is the target.

        The scale stays within [0.5, 1.8] of the organ's reference size; an organ that cannot
        reach its target there (a large organ in a small body) keeps the closest volume and
        a warning says so.
        """
        scale, previous = 1.0, None
        for _ in range(6):
            part = build(scale)
            mask = part.outer & self.canvas.free(part.box) if only_free else part.outer
            volume = max(float(mask.sum()) * self.voxel_ml, 1.0)
            error = volume / target_ml - 1.0
            if abs(error) < 0.02:
                break
            # volume ~ scale^k, k measured from the last two tries (3 for a free solid)
            k = 3.0
            if previous is not None and volume != previous[1]:
                k = math.log(volume / previous[1]) / math.log(scale / previous[0])
                k = float(np.clip(k, 0.5, 6.0))
            previous = (scale, volume)
            new_scale = float(np.clip(scale * (target_ml / volume) ** (1.0 / k), 0.5, 1.8))
            if new_scale == scale:
                break
            scale = new_scale
        if abs(error) > 0.05:
            warnings.warn(
                f"phantom {name} volume {volume:.0f} mL misses its target {target_ml:.0f} mL "
                f"(the organ does not fit this body at that size)",
                stacklevel=3,
            )
        return part, scale

    def paint_heart_and_vessels(self) -> None:
        c = self.canvas
        v = self.vertebra
        z8 = 0.5 * (v["T8"]["top"] + v["T8"]["bottom"])
        axes = _frame((-0.6, 0.45, -0.65), (0.0, 0.0, 1.0))
        x_c = -18.0 - self.p.heart_shift_left_mm  # two thirds of the heart lie left
        y_c = float(self.spine_y(z8)) + v["T8"]["b"] + 60.0 * self.s_d
        z_floor = float(self.diaphragm_z(np.array(x_c), np.array(y_c)))
        semi0 = np.array([62.0, 48.0, 42.0])

        def centre(scale: float) -> np.ndarray:  # the heart rests on the diaphragm
            height = math.sqrt(((axes[2] * semi0 * scale) ** 2).sum())
            return np.array([x_c, y_c, z_floor + 0.8 * height])

        def heart(scale: float) -> _Part:
            part = _ellipsoid(self.grid, centre(scale), semi0 * scale, axes)
            keep = (part.box.z > self.z_dia[part.box.sl[:2]][:, :, None] + 2.0) & self.cavity[
                part.box.sl
            ]
            return _Part(part.box, part.outer & keep, None)

        part, scale = self._fit_volume(heart, self.p.heart_volume_ml, "heart", only_free=False)
        c.paint(part.box, part.outer, _HU["blood"], _ID["heart"])
        base = centre(scale) - axes[:, 0] * 0.75 * semi0[0] * scale

        # Aorta: root at the heart's base, arch over the left main bronchus at T4, then
        # down the left of the spine, through the hiatus at T12, to the bifurcation at L4.
        def at(name: str, frac: float = 0.5) -> float:
            return v[name]["top"] + frac * (v[name]["bottom"] - v[name]["top"])

        def sy(z: float) -> float:
            return float(self.spine_y(z))

        pts = [
            base,
            base + (8.0, 8.0, 25.0),
            (base[0] + 12.0, sy(at("T4")) + 58.0, at("T4", 0.2)),
            (4.0, sy(at("T3")) + 52.0, at("T3", 0.4)),
            (-12.0, sy(at("T3")) + 36.0, at("T3", 0.4)),
            (-20.0, sy(at("T4")) + 16.0, at("T4", 0.4)),
            (-22.0, sy(at("T5")) + 8.0, at("T5", 1.0)),
        ]
        for name in ("T7", "T9", "T11"):
            pts.append((-(v[name]["a"] + 4.0), sy(at(name)) + 8.0, at(name)))
        for name in ("L1", "L2", "L3", "L4"):
            z = at(name, 0.5 if name != "L4" else 0.8)
            pts.append((-10.0, sy(z) + v[name]["b"] + 12.0, z))
        radius = np.array([14, 15, 15, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9], dtype=float)
        part = _merge(self.grid, _sweep(self.grid, pts, radius, radius, up=(1, 0, 0)))
        c.paint(part.box, part.outer, _HU["blood"], _ID["aorta"], only_free=True)

        # Trachea from the top of the neck to the carina at T5; its wall is soft tissue.
        y1 = sy(self.z_t1) + 30.0
        trachea = [
            (0.0, y1, self.z_t1 + _NECK_MM),
            (0.0, y1, self.z_t1),
            (0.0, sy(at("T4")) + 30.0, at("T5", 0.0)),
        ]
        # It runs on up into the larynx: cut it where the neck stub ends.
        wall = _merge(self.grid, _sweep(self.grid, trachea, 11.0, 11.0, up=(1, 0, 0)))
        inside = self.body[wall.box.sl]
        c.paint(wall.box, wall.outer & inside, _HU["soft_tissue"], only_free=True)
        lumen = _merge(self.grid, _sweep(self.grid, trachea, 8.5, 8.5, up=(1, 0, 0)))
        lumen_inside = lumen.outer & self.body[lumen.box.sl]
        lumen_inside &= ndimage.binary_erosion(self.body[lumen.box.sl], iterations=2)
        c.paint(lumen.box, lumen_inside, _HU["air"], _ID["trachea"])
        carina = np.array(trachea[-1])
        self.bronchi = [
            np.array([carina, carina + (side * 38.0, -10.0, -22.0)]) for side in (1.0, -1.0)
        ]

    def paint_lungs(self) -> None:
        """Lungs fill the free thorax on each side of a mediastinal band, split by fissures."""
        c = self.canvas
        zz = np.argwhere(self.cavity.any(axis=(0, 1)))
        z_lo = float(self.z_dia.min())
        box = self.grid.box((-250.0, -250.0, z_lo), (250.0, 250.0, self.grid.axes[2][zz.max()]))
        thorax = self.cavity[box.sl] & (box.z > self.z_dia[box.sl[:2]][:, :, None] + 2.0)
        zr = (box.z - self.z_t1) / self.s_z
        band = np.where(zr > -90.0, 24.0, 10.0).astype(np.float32)  # superior mediastinum wider
        y_vb = self.spine_y(box.z[0, 0]).astype(np.float32)[None, None, :]
        medial = (np.abs(box.x) < band) & (box.y > y_vb - 20.0)
        lung = thorax & ~medial & c.free(box)

        # Dependent (posterior) lung is a little denser when the patient lies supine.
        hu = (_HU["lung"] - _LUNG_GRADIENT_HU * np.clip(box.y / 100.0, -1.0, 1.0)).astype(
            np.float32
        )
        # Oblique fissures from about T3 (left) and T4 (right) at the back down to the front
        # of the diaphragm; the horizontal fissure at the 4th costal cartilage [Gray's, approx.].
        o = self.outline(self.z_at(-150.0))["cavity"]
        y_front, y_back = float(o[1]), -float(o[2])
        z_front = float(self.z_at(-200.0)) + self.p.diaphragm_shift_mm
        oblique = []
        for z_back in (self.vertebra["T3"]["top"], self.vertebra["T4"]["top"]):
            slope = (z_front - z_back) / (y_front - y_back)
            oblique.append(z_back + slope * (box.y - y_back))
        oblique_left, oblique_right = oblique
        horizontal = self.z_at(-105.0)
        right = box.x > 0
        upper_left = box.z > oblique_left
        above_oblique_right = box.z > oblique_right
        lobe_right = np.where(
            above_oblique_right,
            np.where(
                box.z > horizontal, _ID["lung_upper_lobe_right"], _ID["lung_middle_lobe_right"]
            ),
            _ID["lung_lower_lobe_right"],
        )
        lobe_left = np.where(upper_left, _ID["lung_upper_lobe_left"], _ID["lung_lower_lobe_left"])
        c.paint(box, lung, hu, np.where(right, lobe_right, lobe_left).astype(np.int16))
        for path in self.bronchi:
            part = _merge(self.grid, _sweep(self.grid, path, 6.0, 6.0, up=(1, 0, 0)))
            c.paint(part.box, part.outer, _HU["air"])

    # ----- abdomen ----------------------------------------------------------------------

    def _abdomen_clip(self, part: _Part) -> _Part:
        """Keep the part of an organ that lies in the abdominal cavity, under the diaphragm."""
        return _Part(part.box, part.outer & self.abdomen[part.box.sl], part.core)

    def paint_abdominal_organs(self) -> None:
        c = self.canvas
        p = self.p
        v = self.vertebra

        # Kidneys: retroperitoneal beside L1-L3, upper pole medial and posterior, hilum
        # facing anteromedially; the right one lower (under the liver).
        z_left = v["L1"]["bottom"] + p.kidney_left_shift_mm
        kidneys = (
            ("kidney_left", -1.0, z_left, p.kidney_left_volume_ml),
            ("kidney_right", 1.0, z_left - p.kidney_right_drop_mm, p.kidney_right_volume_ml),
        )
        self.kidney_parts = []
        for name, side, z_c, target in kidneys:
            a_vb = v["L1"]["a"]
            centre = np.array(
                [side * (a_vb + 50.0 * self.s_w), float(self.spine_y(z_c)) - 4.0, z_c]
            )
            axes = _frame((-side * 0.3, -0.2, 1.0), (side * 0.85, -0.5, 0.0))
            semi0 = np.array([55.0, 27.0, 17.0])

            def hilum(box: _Box, scale: float, centre=centre, axes=axes, semi0=semi0):
                # the renal sinus: a notch of fat on the anteromedial side
                notch = centre - axes[:, 1] * semi0[1] * scale * 0.85
                return _ellipsoid_mask(box, notch, np.array([22.0, 12.0, 10.0]) * scale, axes)

            def kidney(scale: float, centre=centre, axes=axes, semi0=semi0, hilum=hilum):
                body = _ellipsoid(self.grid, centre, semi0 * scale, axes)
                outer = body.outer & ~hilum(body.box, scale)
                return self._abdomen_clip(_Part(body.box, outer, None))

            part, scale = self._fit_volume(kidney, target, name, only_free=True)
            c.paint(part.box, part.outer, _HU["kidney"], _ID[name], only_free=True)
            sinus = _ellipsoid(self.grid, centre, semi0 * scale, axes)
            c.paint(sinus.box, sinus.outer & hilum(sinus.box, scale), _HU["fat"], only_free=True)
            self.kidney_parts.append((centre, axes, semi0 * scale))

        # Liver: fills the right upper abdomen under the right dome and tapers to the left
        # lobe; its inferior surface rises towards the left.
        o = self.outline(self.z_at(-230.0))["cavity"]
        a_cav, b_ant, b_post = (float(h) for h in o)
        z_dome = float(self.z_at(-185.0)) + p.diaphragm_shift_mm
        x_tip = -0.5 * a_cav  # the left lobe's tip
        x_mid = 0.15 * a_cav  # left of this the liver keeps to the front (stomach behind)
        y_vb = float(self.spine_y(v["T12"]["top"]))
        retro = (v["T12"]["a"] + 35.0, v["T12"]["b"] + 35.0)  # spine, aorta, vena cava, crura

        def liver(scale: float) -> _Part:
            # An ellipsoid rounds the right lobe and the left lobe's tip; a plane sloping down
            # to the right and back makes the inferior border; the left lobe keeps in front.
            centre = (0.25 * a_cav, 0.5 * (b_ant - b_post), z_dome - 60.0 * self.s_z)
            semi = np.array([0.85 * a_cav, 0.62 * (b_ant + b_post), 150.0 * self.s_z]) * scale
            part = _ellipsoid(self.grid, centre, semi)
            box = part.box
            inferior = z_dome - scale * self.s_z * (
                40.0 + 0.5 * (box.x - x_tip) + 0.3 * (b_ant - box.y)
            )
            back = -b_post + 1.3 * np.maximum(x_mid - box.x, 0.0)
            outer = (
                part.outer
                & self.abdomen[box.sl]
                & (box.z > inferior)
                & (box.y > back)
                & ((box.x / retro[0]) ** 2 + ((box.y - y_vb) / retro[1]) ** 2 > 1.0)
            )
            return _Part(box, outer, None)

        part, _ = self._fit_volume(liver, p.liver_volume_ml, "liver", only_free=True)
        c.paint(part.box, part.outer, _HU["liver"], _ID["liver"], only_free=True)

        # Spleen: posterolateral under the left dome, long axis along the 10th rib.
        dome_left = float(self.z_at(-200.0)) + p.diaphragm_shift_mm
        centre = np.array([-(a_cav - 35.0 * self.s_w), -0.45 * b_post, dome_left - 60.0 * self.s_z])
        axes = _frame((-0.2, 0.75, -0.6), (-1.0, 0.0, 0.0))

        def spleen(scale: float) -> _Part:
            return self._abdomen_clip(
                _ellipsoid(self.grid, centre, np.array([58.0, 34.0, 22.0]) * scale, axes)
            )

        part, _ = self._fit_volume(spleen, p.spleen_volume_ml, "spleen", only_free=True)
        c.paint(part.box, part.outer, _HU["spleen"], _ID["spleen"], only_free=True)

        self.paint_stomach(a_cav, b_ant, b_post, dome_left)

        # Perirenal fat, about 1 cm around each kidney, where nothing else is.
        for centre, axes, semi in self.kidney_parts:
            fat = _ellipsoid(self.grid, centre, semi + 10.0, axes)
            c.paint(fat.box, fat.outer & self.abdomen[fat.box.sl], _HU["fat"], only_free=True)

    def paint_stomach(self, a_cav: float, b_ant: float, b_post: float, dome_left: float) -> None:
        """J-shaped stomach: fundus under the left dome, body down and forward, antrum to the
        right of the midline; gas floats to the anterior (upper, supine) part of the lumen."""
        c = self.canvas
        s = self.s_z
        pts = np.array(
            [
                (-0.40 * a_cav, -0.15 * b_post, dome_left - 25.0 * s),
                (-0.50 * a_cav, 0.10 * b_ant, dome_left - 65.0 * s),
                (-0.42 * a_cav, 0.40 * b_ant, dome_left - 105.0 * s),
                (-0.15 * a_cav, 0.55 * b_ant, dome_left - 120.0 * s),
                (0.10 * a_cav, 0.45 * b_ant, dome_left - 110.0 * s),
                (0.22 * a_cav, 0.30 * b_ant, dome_left - 100.0 * s),
            ]
        )
        radius0 = np.array([38.0, 36.0, 32.0, 26.0, 18.0, 11.0])

        def stomach(scale: float) -> _Part:
            r = radius0 * scale
            part = _merge(self.grid, _sweep(self.grid, pts, r, r, up=(1, 0, 0), shell_mm=3.0))
            clipped = self._abdomen_clip(part)
            return _Part(part.box, clipped.outer, part.core & clipped.outer)

        part, _ = self._fit_volume(stomach, self.p.stomach_volume_ml, "stomach", only_free=True)
        wall = c.paint(part.box, part.outer, _HU["muscle"], _ID["stomach"], only_free=True)
        lumen = part.core & wall
        c.paint(part.box, lumen, _HU["fluid"])
        # Gas: the most anterior voxels of the lumen, by whole coronal layers.
        per_y = lumen.sum(axis=(0, 2))[::-1].cumsum()[::-1]  # voxels at or anterior of each y
        n_gas = self.p.stomach_gas_fraction * lumen.sum()
        layers = np.nonzero(per_y <= n_gas)[0]
        if n_gas > 0 and len(layers):
            gas = lumen & (np.arange(lumen.shape[1]) >= layers[0])[None, :, None]
            c.paint(part.box, gas, _HU["air"])

    # ----- skeleton ---------------------------------------------------------------------

    def paint_bones(self) -> None:
        for name in _VERTEBRAE:
            self.canvas.paint_bone(self._vertebra(name), _ID[f"vertebrae_{name}"])
        self.canvas.paint_bone(self._sacrum(), _ID["sacrum"])
        for side, suffix in ((-1.0, "left"), (1.0, "right")):
            self.canvas.paint_bone(self._hip(side), _ID[f"hip_{suffix}"])
        self.canvas.paint_bone(self._sternum(), _ID["sternum"])
        for side, suffix in ((-1.0, "left"), (1.0, "right")):
            for k in range(1, 13):
                rib, cartilage = self._rib(side, k)
                self.canvas.paint_bone(rib, _ID[f"rib_{suffix}_{k}"])
                if cartilage is not None:
                    self.canvas.paint(cartilage.box, cartilage.outer, _HU_CARTILAGE, only_free=True)

    def _vertebra(self, name: str) -> _Part:
        """Body (cortical shell, cancellous core), neural arch, spinous and transverse
        processes of one vertebra."""
        g = self.grid
        v = self.vertebra[name]
        s = self.s_z
        z_c = 0.5 * (v["top"] + v["bottom"])
        y_vb = float(self.spine_y(z_c))
        a, b = v["a"], v["b"]
        lumbar = name.startswith("L")
        level = _VERTEBRAE.index(name)
        half_h = 0.5 * (v["top"] - v["bottom"])

        box = g.box((-a, y_vb - b, v["bottom"]), (a, y_vb + b, v["top"]))
        q = (box.x / a) ** 2 + ((box.y - y_vb) / b) ** 2
        flat = box.y >= y_vb - 0.85 * b
        in_z = np.abs(box.z - z_c) <= half_h
        shell = PHANTOM_SPACING_MM * 1.25
        q_in = (box.x / (a - shell)) ** 2 + ((box.y - y_vb) / (b - shell)) ** 2
        in_z_core = np.abs(box.z - z_c) <= half_h - shell
        body = _Part(
            box,
            (q <= 1) & flat & in_z,
            (q_in <= 1) & (box.y >= y_vb - 0.85 * b + shell) & in_z_core,
        )

        rc_x, rc_y = (11.0 * s, 8.5 * s) if lumbar else (8.0 * s, 7.5 * s)
        y_canal = y_vb - b - rc_y - 1.0
        ring_x, ring_y = rc_x + 6.0 * s, rc_y + 6.0 * s
        box = g.box((-ring_x, y_canal - ring_y, v["bottom"]), (ring_x, y_vb - 0.4 * b, v["top"]))
        ring = ((box.x / ring_x) ** 2 + ((box.y - y_canal) / ring_y) ** 2 <= 1) & (
            (box.x / rc_x) ** 2 + ((box.y - y_canal) / rc_y) ** 2 > 1
        )
        pedicles = (np.abs(box.x) > rc_x - 2.0) & (np.abs(box.x) < ring_x) & (box.y > y_canal)
        arch = _Part(box, (ring | pedicles) & (np.abs(box.z - z_c) <= 0.8 * half_h), None)

        # Spinous process slopes down steeply in the mid-thoracic spine, level in the lumbar.
        angle = math.radians(
            float(np.interp(level, (0, 2, 5, 9, 11, 12, 16), (25, 40, 55, 50, 25, 10, 5)))
        )
        length = (26.0 if lumbar else 28.0) * s
        root = np.array([0.0, y_canal - ring_y + 2.0, z_c])
        tip = root + length * np.array([0.0, -math.cos(angle), -math.sin(angle)])
        spinous = _sweep(g, [root, tip], (9.0 if lumbar else 5.0) * s, 3.5, up=(0, 0, 1))

        transverse = []
        for side in (-1.0, 1.0):
            if lumbar:
                start = (side * (rc_x + 3.0), y_vb - b - 4.0, z_c)
                end = (side * (a + 26.0 * s), y_vb - b - 8.0, z_c)
                transverse += _sweep(g, [start, end], 4.5, 3.0, up=(0, 0, 1))
            else:
                start = (side * (rc_x + 4.0), y_canal, z_c)
                end = (side * (rc_x + 24.0 * s), y_canal - 12.0 * s, z_c + 2.0)
                transverse += _sweep(g, [start, end], 5.0, 4.0, up=(0, 0, 1))
        return _merge(g, [body, arch, *spinous, *transverse])

    def _sacrum(self) -> _Part:
        """Curved, tapering wedge from S1 (with its alae) down and back to the tip."""
        l5 = self.vertebra["L5"]
        y0 = float(self.spine_y(l5["bottom"])) - 3.0
        t = np.linspace(0.0, 1.0, 6)
        s = self.s_z
        pts = np.stack(
            [np.zeros_like(t), y0 - 50.0 * s * t**1.4, self.z_s1 - 8.0 * s - 100.0 * s * t], axis=1
        )
        half_w = (52.0 - 40.0 * t) * self.s_w
        half_t = 20.0 - 12.0 * t
        return _merge(self.grid, _sweep(self.grid, pts, half_w, half_t, up=(1, 0, 0), shell_mm=2.5))

    def _hip(self, side: float) -> _Part:
        """Iliac wing (a bowl-shaped plate from the sacroiliac joint to the anterior superior
        iliac spine), acetabulum, pubic and ischial rami."""
        g = self.grid
        s = self.s_z
        crest = float(self.z_at(-395.0))
        y_c = float(self.spine_y(self.vertebra["L5"]["top"])) + 25.0 * self.s_d
        semi = np.array([120.0 * self.s_w, 95.0 * self.s_d, 133.0 * s])
        depth = 0.78 * semi[2]
        box = g.box(
            (min(0.0, side * semi[0]), y_c - semi[1], crest - depth),
            (max(0.0, side * semi[0]), y_c + semi[1], crest),
        )
        dx, dy, dz = box.x, box.y - y_c, box.z - crest

        def q(shrink: float) -> np.ndarray:
            return (
                (dx / (semi[0] - shrink)) ** 2
                + (dy / (semi[1] - shrink)) ** 2
                + (dz / (semi[2] - shrink)) ** 2
            )

        thick = 8.0
        azimuth = np.degrees(np.arctan2(np.abs(dx), -dy))  # 0 = posterior, 180 = anterior
        crest_z = -35.0 * ((azimuth - 65.0) / 60.0) ** 2
        sector = (azimuth > 18.0) & (azimuth < 125.0) & (dz <= crest_z) & (side * dx > 0)
        q_out = q(0.0)
        wing = _Part(
            box,
            (q_out <= 1) & (q(thick) > 1) & sector,
            (q(2.0) <= 1) & (q(thick - 2.0) > 1) & sector,
        )

        bottom_r = math.sqrt(1.0 - 0.78**2)
        acetabulum = np.array([side * (semi[0] * bottom_r + 5.0), y_c + 10.0, crest - depth - 15.0])
        socket = _ellipsoid(g, acetabulum, np.array([24.0, 26.0, 26.0]) * s, shell_mm=2.5)
        z_sym = acetabulum[2] - 30.0 * s
        y_sym = float(self.outline(z_sym)["lean"][1]) - 28.0 * self.s_d
        symphysis_top = (side * 6.0, y_sym, z_sym + 8.0 * s)
        symphysis_bottom = (side * 6.0, y_sym - 5.0, z_sym - 12.0 * s)
        tuberosity = (
            side * (abs(acetabulum[0]) - 30.0),
            acetabulum[1] - 25.0,
            acetabulum[2] - 55.0 * s,
        )
        rami = (
            _sweep(
                g,
                [acetabulum + (-side * 10.0, 18.0, -5.0), symphysis_top],
                9.0,
                6.0,
                up=(0, 0, 1),
                shell_mm=2.0,
            )
            + _sweep(
                g,
                [acetabulum + (-side * 5.0, -15.0, -15.0), tuberosity],
                12.0,
                10.0,
                up=(1, 0, 0),
                shell_mm=2.5,
            )
            + _sweep(g, [tuberosity, symphysis_bottom], 7.0, 5.0, up=(0, 0, 1), shell_mm=2.0)
        )
        return _merge(g, [wing, socket, *rami])

    def _sternum(self) -> _Part:
        """Manubrium, body and xiphoid: a plate just inside the anterior chest wall."""
        zr = np.array([-45.0, -90.0, -100.0, -170.0, -195.0, -215.0])
        z = self.z_at(zr)
        y = self.outline(z)["cavity"][1] + 6.0
        pts = np.stack([np.zeros_like(z), y, z], axis=1)
        half_w = np.array([28.0, 22.0, 15.0, 16.0, 10.0, 6.0]) * self.s_w
        half_t = np.array([7.0, 6.0, 5.5, 5.5, 4.0, 3.0])
        return _merge(self.grid, _sweep(self.grid, pts, half_w, half_t, up=(1, 0, 0), shell_mm=2.0))

    # Rib k: angular end of its bony part around the chest (degrees from the back), drop of
    # its anterior end below its head (mm, reference torso) [Gray's Anatomy, approx.].
    _RIB_END_DEG = (130, 138, 140, 142, 142, 140, 138, 130, 120, 110, 85, 60)
    _RIB_DROP_MM = (30, 55, 75, 90, 100, 105, 110, 110, 105, 95, 60, 40)
    # Where each costal cartilage ends: on the sternum (ribs 1-7, reference level) or on
    # the cartilage above (ribs 8-10: angle in degrees, reference level).
    _STERNAL_ZR = (-55.0, -92.0, -115.0, -138.0, -158.0, -178.0, -192.0)
    _MARGIN_END = {8: (152.0, -225.0), 9: (145.0, -250.0), 10: (136.0, -268.0)}

    def _ring(self, side: float, angle_deg: np.ndarray, z: np.ndarray, off: float) -> np.ndarray:
        """Points just outside the cavity outline at given angles (0 = back) and levels."""
        a, b_ant, b_post = self.outline(z)["cavity"]
        phi = np.radians(angle_deg)
        b = np.where(np.cos(phi) > 0, b_post, b_ant)
        return np.stack([side * (a + off) * np.sin(phi), -(b + off) * np.cos(phi), z], axis=1)

    def _rib(self, side: float, k: int) -> tuple[_Part, _Part | None]:
        g = self.grid
        v = self.vertebra[f"T{k}"]
        z_head = v["top"] - 2.0
        y_vb = float(self.spine_y(z_head))
        semi_u, semi_v = (4.5, 3.0) if k >= 11 else (6.0, 3.5)
        off = semi_v + 1.0

        head = (side * (v["a"] + 2.0), y_vb - 0.3 * v["b"], z_head)
        tubercle = (side * (v["a"] + 18.0), y_vb - v["b"] - 8.0, z_head - 3.0)
        end_deg = self._RIB_END_DEG[k - 1]
        drop = self._RIB_DROP_MM[k - 1] * self.s_z
        a0 = float(self.outline(z_head)["cavity"][0])
        start_deg = math.degrees(math.asin(min(0.95, (v["a"] + 30.0) / (a0 + off))))
        t = np.linspace(0.0, 1.0, 12)
        angle = start_deg + (end_deg - start_deg) * t
        z = z_head - 4.0 - drop * t**1.5
        pts = np.concatenate([np.array([head, tubercle]), self._ring(side, angle, z, off)])
        rib = _merge(g, _sweep(g, pts, semi_u, semi_v, up=(0, 0, 1), shell_mm=1.6))

        if k <= 7:
            end_z = float(self.z_at(self._STERNAL_ZR[k - 1]))
            half_w = (
                0.5
                * np.interp(self._STERNAL_ZR[k - 1], (-170.0, -90.0, -45.0), (32.0, 44.0, 56.0))
                * self.s_w
            )
            a_end = float(self.outline(end_z)["cavity"][0])
            end_deg2 = 180.0 - math.degrees(math.asin(min(1.0, half_w / (a_end + off))))
        elif k <= 10:
            end_deg2, zr = self._MARGIN_END[k]
            end_z = float(self.z_at(zr))
        else:
            return rib, None
        t = np.linspace(0.0, 1.0, 6)
        angle = end_deg + (end_deg2 - end_deg) * t
        z = z[-1] + (end_z - z[-1]) * t
        cartilage = _merge(g, _sweep(g, self._ring(side, angle, z, off), 5.0, 4.0, up=(0, 0, 1)))
        return rib, cartilage

    # ----- noise ------------------------------------------------------------------------

    def add_noise(self) -> None:
        """White Gaussian CT noise inside the body; outside stays exactly air."""
        std = self.p.hu_noise_std_hu
        if std <= 0:
            return
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(_STREAM_NOISE,)))
        noise = rng.standard_normal(PHANTOM_SHAPE, dtype=np.float32)
        noise *= np.float32(std)
        np.add(self.canvas.hu, noise, out=self.canvas.hu, where=self.body)

"""Standard X-ray views as data: centring target, structures shown, beam direction, tolerances.

A view's beam direction is given the way clinicians give it, as the C-arm's
LAO/RAO (primary) and cranial/caudal (secondary) angles relative to an AP
projection, and converted to a unit vector in patient axes with the spherical
convention of angiographic view planning (Dumay et al. 1994, "Determination of
optimal angiographic viewing angles", IEEE TMI 13(1)): the detector lies at
longitude LAO (towards the patient's left) and latitude cranial (towards the
head). The C-arm's own joints compose the two rotations in their mechanical
order, so reaching a combined oblique view needs slightly different joint
angles; the controller solves for them.

Exposure settings are typical adult radiographic techniques from teaching
references (chest and pelvis as in FACTS.md; the others approx.).

Limitations: a view fixes the beam direction only, not the detector's roll about
it; centring is on one structure's centroid, not on landmarks such as the
anterior superior iliac spines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sonoray.assets.patient import Patient


@dataclass(frozen=True)
class XRayView:
    """One standard X-ray view.

    Attributes:
        name: Task identifier, e.g. ``"chest_ap"``.
        description: One line for humans.
        target: Structure (TotalSegmentator name or group) whose centroid the central
            ray must pass through; small enough to fit in the field.
        shows: Structures or groups the image should show; they count in the image
            score (coverage), not in success, since large ones do not fit the field.
        lao_deg: Primary angle, LAO positive (detector towards the patient's left),
            RAO negative.
        cranial_deg: Secondary angle, cranial positive (detector towards the head),
            caudal negative.
        kvp: Nominal tube voltage (kV).
        mas: Nominal tube current-time product (mAs).
        angle_tolerance_deg: Largest angle between the central ray and the view's beam
            direction that counts as reached.
        centring_tolerance_mm: Largest distance of the target's centroid from the central
            ray (at the target) that counts as reached.
    """

    name: str
    description: str
    target: str
    shows: tuple[str, ...]
    lao_deg: float = 0.0
    cranial_deg: float = 0.0
    kvp: float = 80.0
    mas: float = 10.0
    angle_tolerance_deg: float = 3.0
    centring_tolerance_mm: float = 10.0

    @property
    def structures(self) -> tuple[str, ...]:
        """Every structure the view needs: the target first, then what it shows."""
        return (self.target, *(s for s in self.shows if s != self.target))

    def beam_direction_in_patient(self) -> np.ndarray:
        """Unit vector from source to detector in patient RAS axes, shape ``(3,)``."""
        return beam_direction_in_patient(self.lao_deg, self.cranial_deg)

    def missing_structures(self, patient: Patient) -> list[str]:
        """Names of the view's structures that ``patient`` lacks (empty if it supports it)."""
        return [s for s in self.structures if not patient.has_structure(s)]


def beam_direction_in_patient(lao_deg: float, cranial_deg: float) -> np.ndarray:
    """Source-to-detector unit vector in patient RAS for LAO/RAO and cranial/caudal angles.

    AP (0, 0) points anterior (+y); LAO 90 points to the patient's left (-x); cranial
    90 points to the head (+z).
    """
    a, c = np.deg2rad(lao_deg), np.deg2rad(cranial_deg)
    return np.array([-np.sin(a) * np.cos(c), np.cos(a) * np.cos(c), np.sin(c)])


def angles_of_beam_direction(direction_in_patient: np.ndarray) -> tuple[float, float]:
    """Inverse of :func:`beam_direction_in_patient`: ``(lao_deg, cranial_deg)``."""
    d = np.asarray(direction_in_patient, dtype=np.float64)
    d = d / np.linalg.norm(d)
    cranial = np.degrees(np.arcsin(np.clip(d[2], -1.0, 1.0)))
    lao = np.degrees(np.arctan2(-d[0], d[1]))
    return float(lao), float(cranial)


_VIEWS = (
    XRayView(
        "chest_ap",
        "Frontal chest, central ray through T7",
        target="vertebrae_T7",
        shows=("lungs", "heart"),
        kvp=110.0,
        mas=2.0,
    ),
    XRayView(
        "thoracic_spine_lateral",
        "Left lateral thoracic spine centred on T7",
        target="vertebrae_T7",
        shows=("vertebrae_T6", "vertebrae_T7", "vertebrae_T8"),
        lao_deg=90.0,
        kvp=85.0,
        mas=30.0,
    ),
    XRayView(
        "lumbar_spine_ap",
        "Frontal lumbar spine centred on L3",
        target="vertebrae_L3",
        shows=("vertebrae_L2", "vertebrae_L3", "vertebrae_L4"),
        kvp=80.0,
        mas=25.0,
    ),
    XRayView(
        "lumbar_spine_lateral",
        "Left lateral lumbar spine centred on L3",
        target="vertebrae_L3",
        shows=("vertebrae_L2", "vertebrae_L3", "vertebrae_L4"),
        lao_deg=90.0,
        kvp=90.0,
        mas=40.0,
    ),
    XRayView(
        "pelvis_ap",
        "Frontal pelvis centred on the sacrum",
        target="sacrum",
        shows=("sacrum", "hip_left", "hip_right"),
        kvp=75.0,
        mas=20.0,
    ),
    XRayView(
        "kidney_ap",
        "Frontal view of the left kidney",
        target="kidney_left",
        shows=("kidney_left",),
        kvp=75.0,
        mas=20.0,
    ),
    XRayView(
        "cardiac_oblique",
        "Cardiac LAO 30 / cranial 20 oblique",
        target="heart",
        shows=("heart", "aorta"),
        lao_deg=30.0,
        cranial_deg=20.0,
        kvp=80.0,
        mas=1.0,
    ),
)

#: Task name -> view.
XRAY_VIEWS: dict[str, XRayView] = {v.name: v for v in _VIEWS}


def get_view(name: str) -> XRayView:
    """The standard view called ``name``.

    Raises:
        ValueError: naming the unknown task and listing the known ones.
    """
    if name not in XRAY_VIEWS:
        raise ValueError(f"unknown X-ray task {name!r}; known tasks: {sorted(XRAY_VIEWS)}")
    return XRAY_VIEWS[name]


def supported_views(patients: list[Patient] | tuple[Patient, ...]) -> list[str]:
    """Names of the views every one of ``patients`` has all the structures for."""
    return [n for n, v in XRAY_VIEWS.items() if not any(v.missing_structures(p) for p in patients)]

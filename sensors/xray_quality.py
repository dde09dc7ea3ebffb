"""Image-quality scores of radiographs against a task's standard view, batched, in [0, 1].

Five parts, each a score in [0, 1] with its raw value:

- coverage: fraction of the target's points (e.g. its voxel centres) whose rays land inside
  the collimated field. Points cover the whole target, so a target running off the detector
  counts as not covered.
- centring: distance d (mm) of the target centroid from the central ray (source to detector
  centre), i.e. the offset at the target's depth; score ``2 ** -(d / centring_half_mm) ** 2``
  (0.5 at ``centring_half_mm``).
- view angle: angle a (degrees) between the central ray and the standard beam direction;
  score ``2 ** -(a / angle_half_deg) ** 2``. Pelphix (Killeen et al. 2023) counts a view
  reached under 2 degrees.
- contrast: CNR = |mean target - mean background| / std background on the displayed 8-bit
  image (FACTS.md), target = pixels whose ray crosses at least ``target_min_path_mm`` of the
  target, background = a ring of ``ring_fraction`` of the image size around it, both inside
  the field; the std is floored at the 8-bit quantisation noise 1/sqrt(12). Score
  ``1 - exp(-CNR / cnr_scale)``. The background std includes anatomical texture, not only
  quantum noise, so values are lower than the Rose criterion's 3-5 for noise alone: about
  0.5-1 for a thoracic vertebra on an AP chest view, hence ``cnr_scale`` 1.
- exposure: fraction of the exposed pixels behind the patient (transmission below
  ``direct_beam_transmission``) whose primary detector air kerma lies in ``kerma_range_ugy``.
  The range brackets a typical digital-radiography target of about 2.5 uGy (exposure index
  EI = 100 x K_uGy of IEC 62494-1, target about 250) by a factor 4 each way (approx.).

Overall = weighted mean of the five scores (``weights``, normalised to sum 1).

Limitations: CNR uses anatomy around the target as background, so it mixes quantum noise with
anatomical texture; the kerma range is a convention, not a diagnostic threshold; coverage
treats every target point alike (a volume fraction, not an area fraction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sonoray.sensors.drr import XRayImage
from sonoray.sensors.xray_geometry import XRayGeometry

#: Standard deviation of 8-bit rounding noise (grey levels), the CNR's noise floor.
QUANTISATION_STD = 1.0 / math.sqrt(12.0)


@dataclass(frozen=True)
class XRayQualityParams:
    """Scales and weights of the scores (defaults documented in the module docstring)."""

    centring_half_mm: float = 20.0
    angle_half_deg: float = 5.0
    cnr_scale: float = 1.0
    target_min_path_mm: float = 5.0
    ring_fraction: float = 0.05
    direct_beam_transmission: float = 0.9
    kerma_range_ugy: tuple[float, float] = (0.625, 10.0)
    weights: dict = field(
        default_factory=lambda: {
            "coverage": 0.25,
            "centring": 0.2,
            "view_angle": 0.25,
            "contrast": 0.15,
            "exposure": 0.15,
        }
    )

    def __post_init__(self) -> None:
        for name in ("centring_half_mm", "angle_half_deg", "cnr_scale", "ring_fraction"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        lo, hi = self.kerma_range_ugy
        if not 0 <= lo < hi:
            raise ValueError(f"kerma_range_ugy must be (low, high), 0 <= low < high, got {lo, hi}")
        expected = {"coverage", "centring", "view_angle", "contrast", "exposure"}
        if set(self.weights) != expected or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"weights must give a value >= 0 for each of {sorted(expected)}")
        if sum(self.weights.values()) <= 0:
            raise ValueError("weights must not all be 0")


@dataclass(frozen=True)
class XRayViewTarget:
    """The task side of a standard view, for B exposures (array-likes broadcast).

    Attributes:
        target_centroid_mm: (B, 3) or (3,) centring target in patient mm.
        standard_beam_dir: (B, 3) or (3,) source -> detector direction of the standard view.
        target_points_mm: (N, 3) or (B, N, 3) points of the target (e.g. voxel centres).
    """

    target_centroid_mm: torch.Tensor
    standard_beam_dir: torch.Tensor
    target_points_mm: torch.Tensor


@dataclass
class XRayQuality:
    """Scores in [0, 1] and their raw parts, each (B,)."""

    overall: torch.Tensor
    coverage: torch.Tensor
    centring: torch.Tensor
    view_angle: torch.Tensor
    contrast: torch.Tensor
    exposure: torch.Tensor
    centring_error_mm: torch.Tensor
    view_angle_error_deg: torch.Tensor
    cnr: torch.Tensor
    underexposed_fraction: torch.Tensor
    overexposed_fraction: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


def _vectors(value, name: str, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[-1] != 3 or t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be (3,) or ({batch}, 3), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite")
    return t.expand(batch, 3)


def _half_score(value: torch.Tensor, half: float) -> torch.Tensor:
    """1 at 0, 0.5 at ``half``, Gaussian fall-off."""
    return torch.exp2(-((value / half) ** 2))


def coverage_fraction(geometry: XRayGeometry, points_mm: torch.Tensor) -> torch.Tensor:
    """(B,) fraction of points whose ray from the source lands inside the collimated field."""
    uv = geometry.project(points_mm)  # (B, N, 2) column, row; NaN behind the source
    centre = torch.tensor(
        [(geometry.cols - 1) / 2, (geometry.rows - 1) / 2], device=geometry.device
    )
    half_px = (geometry.field_size_mm / geometry.pixel_mm).flip(-1) / 2  # (B, 2) cols, rows
    inside = ((uv - centre).abs() <= half_px[:, None]).all(-1)  # NaN compares False
    return inside.float().mean(-1)


def centring_error_mm(geometry: XRayGeometry, centroid_mm: torch.Tensor) -> torch.Tensor:
    """(B,) distance of the centroid from the central ray (source -> detector centre)."""
    offset = centroid_mm - geometry.source_mm
    return torch.linalg.cross(offset, geometry.beam_dir, dim=-1).norm(dim=-1)


def view_angle_error_deg(geometry: XRayGeometry, standard_beam_dir: torch.Tensor) -> torch.Tensor:
    """(B,) angle between the central ray and the standard beam direction (degrees)."""
    std = standard_beam_dir / standard_beam_dir.norm(dim=-1, keepdim=True)
    cos = (geometry.beam_dir * std).sum(-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def contrast_to_noise(
    image: torch.Tensor, target: torch.Tensor, background: torch.Tensor
) -> torch.Tensor:
    """(B,) CNR of an image between a target and a background mask (0 where one is empty).

    Args:
        image: (B, H, W) values (grey levels).
        target, background: (B, H, W) bool masks.
    """
    t, bg = target.float(), background.float()
    n_t, n_b = t.sum((-2, -1)), bg.sum((-2, -1))
    mean_t = (image * t).sum((-2, -1)) / n_t.clamp(min=1)
    mean_b = (image * bg).sum((-2, -1)) / n_b.clamp(min=1)
    var_b = ((image - mean_b[:, None, None]) ** 2 * bg).sum((-2, -1)) / n_b.clamp(min=1)
    std_b = var_b.sqrt().clamp(min=QUANTISATION_STD)
    cnr = (mean_t - mean_b).abs() / std_b
    return torch.where((n_t > 0) & (n_b > 0), cnr, torch.zeros_like(cnr))


def xray_image_quality(
    geometry: XRayGeometry,
    image: XRayImage,
    target_footprint_mm: torch.Tensor,
    view: XRayViewTarget,
    params: XRayQualityParams | None = None,
) -> XRayQuality:
    """Score B radiographs against a standard view.

    Args:
        geometry: The B exposures that made ``image``.
        image: Output of ``XRaySensor.render``.
        target_footprint_mm: (B, H, W) or (B, 1, H, W) path length of each ray in the
            target (``XRaySensor.project_labels``).
        view: Target centroid, points and standard beam direction.
        params: Scales and weights; defaults of :class:`XRayQualityParams`.
    """
    params = params or XRayQualityParams()
    b, dev = geometry.batch_size, image.image.device
    geometry = geometry.to(dev)
    footprint = torch.as_tensor(target_footprint_mm, device=dev)
    if footprint.ndim == 4 and footprint.shape[1] == 1:
        footprint = footprint[:, 0]
    expected = (b, geometry.rows, geometry.cols)
    if tuple(footprint.shape) != expected:
        raise ValueError(f"target_footprint_mm must be {expected}, got {tuple(footprint.shape)}")
    centroid = _vectors(view.target_centroid_mm, "target_centroid_mm", b, dev)
    standard = _vectors(view.standard_beam_dir, "standard_beam_dir", b, dev)
    if (standard.norm(dim=-1) < 1e-9).any():
        raise ValueError("standard_beam_dir must be a non-zero direction")

    coverage = coverage_fraction(geometry, torch.as_tensor(view.target_points_mm, device=dev))
    centring_mm = centring_error_mm(geometry, centroid)
    angle_deg = view_angle_error_deg(geometry, standard)

    # Contrast: target footprint against a ring around it, inside the field.
    exposed = image.exposed[:, 0]
    target = (footprint >= params.target_min_path_mm) & exposed
    ring = max(1, round(params.ring_fraction * min(geometry.rows, geometry.cols)))
    grown = F.max_pool2d(target[:, None].float(), 2 * ring + 1, stride=1, padding=ring)[:, 0]
    background = (grown > 0) & ~(footprint > 0) & exposed
    cnr = contrast_to_noise(image.image[:, 0].float(), target, background)

    # Exposure: detector kerma of exposed pixels behind the patient.
    behind = exposed & (image.transmission[:, 0] < params.direct_beam_transmission)
    kerma = image.detector_kerma_ugy[:, 0]
    lo, hi = params.kerma_range_ugy
    n_behind = behind.float().sum((-2, -1)).clamp(min=1)
    under = ((kerma < lo) & behind).float().sum((-2, -1)) / n_behind
    over = ((kerma > hi) & behind).float().sum((-2, -1)) / n_behind
    exposure = torch.where(behind.any(-1).any(-1), 1.0 - under - over, torch.zeros_like(under))

    scores = {
        "coverage": coverage,
        "centring": _half_score(centring_mm, params.centring_half_mm),
        "view_angle": _half_score(angle_deg, params.angle_half_deg),
        "contrast": 1.0 - torch.exp(-cnr / params.cnr_scale),
        "exposure": exposure,
    }
    total = sum(params.weights.values())
    overall = sum(params.weights[k] * v for k, v in scores.items()) / total
    return XRayQuality(
        overall=overall,
        **scores,
        centring_error_mm=centring_mm,
        view_angle_error_deg=angle_deg,
        cnr=cnr,
        underexposed_fraction=under,
        overexposed_fraction=over,
    )

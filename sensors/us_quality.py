"""Ultrasound image-quality scores in [0, 1], and the physical parts they come from.

Each score is computed per batch item from a :class:`~sonoray.sensors.ultrasound.BModeFrame`
(rendered with ``target_ids``), the probe pose and the task's standard plane:

- ``coupling`` = coupled fraction of the aperture: the mean of the per-line coupling.
- ``visibility`` = A / min(A_ref, A_sector), clipped to [0, 1]: A is the target's
  cross-section inside the sector (mm^2, from the target mask); A_ref is the largest
  cross-section the target can show, given by the caller (e.g. its area on the standard
  plane, :func:`target_area_on_plane_mm2`) or else the target's cross-section on the whole
  current image plane; A_sector is the sector's area, since no image shows more.
- ``contrast`` = gCNR of target pixels against the surrounding ring of sector pixels
  (Rodriguez-Molares et al., "The generalized contrast-to-noise ratio", IEEE TUFFC 2020):
  1 - sum_k min(p_target(k), p_surround(k)) over grey-level histograms.
- ``confidence`` = mean of the frame's confidence (transmitted intensity) over the target.
- ``distance`` = exp(-d^2 / (2 s_d^2)), d = distance (mm) of the standard plane's centre
  from the image plane, s_d = ``distance_scale_mm`` (10 mm: 0.88 at 5 mm, 0.14 at 20 mm).
- ``angle`` = exp(-a^2 / (2 s_a^2)), a = angle (deg) between the image plane and the
  standard plane (0-90) or, when an in-plane reference axis is given, the larger of that
  and the angle (0-180) between the image's +x axis and the reference axis (which catches
  a reversed marker); s_a = ``angle_scale_deg`` (10 degrees).
- ``overall`` = weighted geometric mean prod_i s_i^(w_i / sum_j w_j) of the scores present
  (the plane scores only when a standard plane is given); one zero score makes it zero.

Limitations: gCNR from histograms is biased upwards when the target covers few pixels
(sparse histograms overlap little); the default 32 bins keep this small above about a
hundred pixels. ``visibility`` is geometric (it reads labels, not the image), so a target
hidden in a shadow still counts as visible there; ``contrast`` and ``confidence`` penalise it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

#: Score names in the order they are reported.
SCORE_NAMES = ("coupling", "visibility", "contrast", "confidence", "distance", "angle")

_DEFAULT_WEIGHTS = {
    "coupling": 1.0,
    "visibility": 1.0,
    "contrast": 0.5,
    "confidence": 0.5,
    "distance": 1.0,
    "angle": 1.0,
}


@dataclass(frozen=True)
class QualityConfig:
    """Scales and weights of the ultrasound quality scores.

    Attributes:
        distance_scale_mm: Gaussian scale of the plane-distance score.
        angle_scale_deg: Gaussian scale of the plane-angle score.
        surround_mm: Width of the ring around the target that gCNR compares it with.
        n_bins: Grey-level histogram bins for gCNR (over 0-255).
        weights: Weight of each score in ``overall`` (keys of ``SCORE_NAMES``).
    """

    distance_scale_mm: float = 10.0
    angle_scale_deg: float = 10.0
    surround_mm: float = 10.0
    n_bins: int = 32
    weights: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_WEIGHTS))

    def __post_init__(self) -> None:
        for name in ("distance_scale_mm", "angle_scale_deg", "surround_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if int(self.n_bins) != self.n_bins or not 2 <= self.n_bins <= 256:
            raise ValueError(f"n_bins must be an integer in [2, 256], got {self.n_bins!r}")
        unknown = set(self.weights) - set(SCORE_NAMES)
        if unknown:
            raise ValueError(f"unknown score weights {sorted(unknown)}; allowed: {SCORE_NAMES}")
        if any(not (math.isfinite(w) and w >= 0) for w in self.weights.values()):
            raise ValueError(f"weights must be finite and >= 0, got {self.weights}")


def gcnr(
    image: torch.Tensor, target_mask: torch.Tensor, background_mask: torch.Tensor, n_bins: int = 32
) -> torch.Tensor:
    """Generalized contrast-to-noise ratio of two pixel sets, ``(B,)`` in [0, 1].

    Args:
        image: uint8 ``(B, H, W)``.
        target_mask: bool ``(B, H, W)``.
        background_mask: bool ``(B, H, W)`` (or ``(H, W)``).
        n_bins: Histogram bins over 0-255.

    Returns:
        1 - overlap of the two normalised histograms; 0 where either set is empty.
    """
    batch = image.shape[0]
    bins = (image.long() * n_bins // 256).reshape(batch, -1)

    def histogram(mask):
        weights = mask.expand_as(image).reshape(batch, -1).to(torch.float32)
        counts = torch.zeros(batch, n_bins, device=image.device).scatter_add_(1, bins, weights)
        total = counts.sum(1)
        return counts / total.clamp_min(1.0)[:, None], total

    p_target, n_target = histogram(target_mask)
    p_background, n_background = histogram(background_mask)
    value = 1.0 - torch.minimum(p_target, p_background).sum(1)
    return torch.where((n_target > 0) & (n_background > 0), value, torch.zeros_like(value))


def plane_errors(
    probe_in_patient, plane_point_mm, plane_normal, lateral_axis=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Distance and angles between probe image planes and a standard plane (float64, ``(B,)``).

    Args:
        probe_in_patient: ``(B, 4, 4)`` or ``(4, 4)``; the image plane is the probe's x-z plane.
        plane_point_mm: Centre of the standard plane (e.g. the target's centroid), ``(3,)`` or
            ``(B, 3)``.
        plane_normal: Its normal, ``(3,)`` or ``(B, 3)`` (need not be unit; sign irrelevant).
        lateral_axis: Direction the image's +x axis should take, ``(3,)`` or ``(B, 3)``; optional.

    Returns:
        ``(distance_mm, plane_angle_deg, lateral_angle_deg)``: the centre's distance from the
        image plane, the angle between the planes (0-90), and the angle between the probe's
        +x axis and ``lateral_axis`` (0-180; ``None`` without it).
    """
    pose = torch.as_tensor(probe_in_patient, dtype=torch.float64).cpu()
    pose = pose[None] if pose.ndim == 2 else pose
    if pose.ndim != 3 or pose.shape[1:] != (4, 4) or not torch.isfinite(pose).all():
        raise ValueError(f"probe_in_patient must be finite (B, 4, 4), got {tuple(pose.shape)}")
    point = _vectors(plane_point_mm, "plane_point_mm", unit=False)
    normal = _vectors(plane_normal, "plane_normal", unit=True)
    elevation = pose[:, :3, 1]
    distance = ((point - pose[:, :3, 3]) * elevation).sum(-1).abs()
    cosine = (normal * elevation).sum(-1).abs().clamp(max=1.0)
    plane_angle = torch.rad2deg(torch.arccos(cosine))
    lateral_angle = None
    if lateral_axis is not None:
        axis = _vectors(lateral_axis, "lateral_axis", unit=True)
        cosine = (axis * pose[:, :3, 0]).sum(-1).clamp(-1.0, 1.0)
        lateral_angle = torch.rad2deg(torch.arccos(cosine))
    return distance, plane_angle, lateral_angle


def ultrasound_quality(
    frame,
    probe_in_patient,
    plane_point_mm=None,
    plane_normal=None,
    coupling=None,
    *,
    lateral_axis=None,
    max_target_area_mm2=None,
    config: QualityConfig | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Scores in [0, 1] and their physical parts for a batch of frames.

    Args:
        frame: A ``BModeFrame`` rendered with ``target_ids``.
        probe_in_patient: The poses it was rendered at, ``(B, 4, 4)`` or ``(4, 4)``.
        plane_point_mm: Centre of the standard plane (``None``: no plane scores).
        plane_normal: Normal of the standard plane (with ``plane_point_mm``).
        coupling: Per-line coupling ``(B, L)`` or ``(L,)`` given to the renderer; ``None`` =
            fully coupled.
        lateral_axis: In-plane reference axis: where the image's +x should point.
        max_target_area_mm2: Largest cross-section the target can show (float or ``(B,)``);
            default: its cross-section on the current image plane.
        config: :class:`QualityConfig`.

    Returns:
        ``(scores, parts)``: ``scores`` maps ``overall`` and each of ``SCORE_NAMES`` present to
        ``(B,)`` tensors in [0, 1]; ``parts`` holds ``coupled_fraction``, ``target_area_mm2``,
        ``reference_area_mm2``, ``gcnr``, ``mean_confidence`` and, with a plane,
        ``distance_mm``, ``plane_angle_deg`` (and ``lateral_angle_deg``).

    Raises:
        ValueError: if the frame has no target mask, or for inconsistent shapes.
    """
    config = config or QualityConfig()
    if frame.target_mask is None:
        raise ValueError("the frame has no target mask: render it with target_ids")
    image, target = frame.image, frame.target_mask
    batch, device = image.shape[0], image.device
    pixel_area_mm2 = frame.pixel_size_mm[0] * frame.pixel_size_mm[1]
    sector = frame.sector_mask

    parts = {"coupled_fraction": _coupled_fraction(coupling, batch, device)}
    parts["target_area_mm2"] = target.sum((1, 2)).to(torch.float32) * pixel_area_mm2
    if max_target_area_mm2 is None:
        reference = frame.target_plane_area_mm2
    else:
        reference = torch.as_tensor(max_target_area_mm2, dtype=torch.float32, device=device)
        if reference.ndim > 1 or reference.numel() not in (1, batch) or (reference < 0).any():
            raise ValueError(f"max_target_area_mm2 must be >= 0, a float or ({batch},)")
    sector_area_mm2 = float(sector.sum()) * pixel_area_mm2
    parts["reference_area_mm2"] = reference.clamp(max=sector_area_mm2).expand(batch)

    radius_px = max(1, round(config.surround_mm / min(frame.pixel_size_mm)))
    grown = F.max_pool2d(target[:, None].float(), 2 * radius_px + 1, 1, radius_px)[:, 0] > 0
    surround = grown & ~target & sector
    parts["gcnr"] = gcnr(image, target, surround, config.n_bins)
    n_target = target.sum((1, 2)).to(torch.float32)
    weighted = (frame.confidence * target).sum((1, 2))
    parts["mean_confidence"] = torch.where(n_target > 0, weighted / n_target.clamp_min(1), 0.0)

    visibility = parts["target_area_mm2"] / parts["reference_area_mm2"].clamp_min(1e-9)
    scores = {
        "coupling": parts["coupled_fraction"],
        "visibility": torch.where(parts["reference_area_mm2"] > 0, visibility, 0.0).clamp(0, 1),
        "contrast": parts["gcnr"],
        "confidence": parts["mean_confidence"].clamp(0, 1),
    }
    if (plane_point_mm is None) != (plane_normal is None):
        raise ValueError("give both plane_point_mm and plane_normal, or neither")
    if plane_point_mm is not None:
        distance, plane_angle, lateral_angle = plane_errors(
            probe_in_patient, plane_point_mm, plane_normal, lateral_axis
        )
        if distance.shape[0] != batch:
            raise ValueError(f"{distance.shape[0]} poses for {batch} frames")
        parts["distance_mm"] = distance.to(torch.float32).to(device)
        parts["plane_angle_deg"] = plane_angle.to(torch.float32).to(device)
        angle = parts["plane_angle_deg"]
        if lateral_angle is not None:
            parts["lateral_angle_deg"] = lateral_angle.to(torch.float32).to(device)
            angle = torch.maximum(angle, parts["lateral_angle_deg"])
        scores["distance"] = torch.exp(
            -0.5 * (parts["distance_mm"] / config.distance_scale_mm) ** 2
        )
        scores["angle"] = torch.exp(-0.5 * (angle / config.angle_scale_deg) ** 2)

    weights = {k: config.weights.get(k, 0.0) for k in scores}
    total = sum(weights.values())
    overall = torch.ones(batch, device=device)
    for name, value in scores.items():
        if weights[name] > 0:
            overall = overall * value.clamp(0, 1) ** (weights[name] / total)
    return {"overall": overall, **scores}, parts


def ultrasound_scores(*args, **kwargs) -> dict[str, torch.Tensor]:
    """The scores of :func:`ultrasound_quality` alone (same arguments)."""
    return ultrasound_quality(*args, **kwargs)[0]


def target_area_on_plane_mm2(
    labels: np.ndarray,
    affine: np.ndarray,
    target_ids,
    point_mm,
    normal,
    *,
    half_extent_mm: float = 250.0,
    spacing_mm: float = 1.0,
) -> float:
    """Cross-section (mm^2) of the labelled targets on a plane, by nearest-voxel sampling.

    Args:
        labels: Label volume ``(I, J, K)``.
        affine: Its voxel -> patient mm affine.
        target_ids: Label ids that make up the target.
        point_mm: A point of the plane; the sampled square is centred on it.
        normal: The plane's normal.
        half_extent_mm: Half side of the sampled square.
        spacing_mm: Sampling step in the plane.
    """
    if not (spacing_mm > 0 and half_extent_mm > 0):
        raise ValueError(
            f"spacing_mm and half_extent_mm must be > 0, got {spacing_mm}, {half_extent_mm}"
        )
    normal = _vectors(normal, "normal", unit=True)[0].numpy()
    helper = np.eye(3)[np.argmin(np.abs(normal))]
    u = np.cross(normal, helper)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    steps = np.arange(-half_extent_mm, half_extent_mm + 1e-9, spacing_mm)
    a, b = np.meshgrid(steps, steps, indexing="ij")
    points = np.asarray(point_mm, dtype=np.float64) + a[..., None] * u + b[..., None] * v
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    ijk = np.floor(points @ inverse[:3, :3].T + inverse[:3, 3] + 0.5).astype(np.int64)
    inside = np.all((ijk >= 0) & (ijk < np.array(labels.shape)), axis=-1)
    values = labels[tuple(np.where(inside[..., None], ijk, 0).transpose(2, 0, 1))]
    hit = inside & np.isin(values, np.asarray(target_ids).reshape(-1))
    return float(hit.sum() * spacing_mm**2)


def _coupled_fraction(coupling, batch: int, device) -> torch.Tensor:
    if coupling is None:
        return torch.ones(batch, device=device)
    coupling = torch.as_tensor(coupling, dtype=torch.float32, device=device)
    coupling = coupling[None] if coupling.ndim == 1 else coupling
    if coupling.ndim != 2 or coupling.shape[0] != batch:
        raise ValueError(f"coupling must be (L,) or ({batch}, L), got {tuple(coupling.shape)}")
    return coupling.mean(1).clamp(0, 1)


def _vectors(value, name: str, unit: bool) -> torch.Tensor:
    vectors = torch.as_tensor(value, dtype=torch.float64).cpu()
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or vectors.shape[1] != 3 or not torch.isfinite(vectors).all():
        raise ValueError(f"{name} must be finite (3,) or (B, 3), got shape {tuple(vectors.shape)}")
    if unit:
        norm = vectors.norm(dim=-1, keepdim=True)
        if (norm < 1e-9).any():
            raise ValueError(f"{name} must be non-zero")
        vectors = vectors / norm
    return vectors

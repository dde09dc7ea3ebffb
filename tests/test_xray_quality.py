"""X-ray image-quality scores: each part against analytic values, batching and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sonoray.sensors.drr import XRaySensor
from sonoray.sensors.xray_geometry import XRayGeometry
from sonoray.sensors.xray_quality import (
    QUANTISATION_STD,
    XRayQualityParams,
    XRayViewTarget,
    centring_error_mm,
    contrast_to_noise,
    coverage_fraction,
    view_angle_error_deg,
    xray_image_quality,
)

N, SPACING_MM = 40, 2.0


def grid_affine() -> np.ndarray:
    aff = np.diag([SPACING_MM, SPACING_MM, SPACING_MM, 1.0])
    aff[:3, 3] = -(N - 1) / 2 * SPACING_MM
    return aff


@pytest.fixture(scope="module")
def bone_in_tissue():
    """Soft tissue block with a 'vertebra' (label 1) at the centre."""
    hu = np.full((N, N, N), 40.0, dtype=np.float32)
    labels = np.zeros((N, N, N), dtype=np.int16)
    hu[16:24, 16:24, 14:26] = 900.0
    labels[16:24, 16:24, 14:26] = 1
    sensor = XRaySensor(hu, grid_affine(), labels=labels, label_names={1: "vertebrae_T8"})
    aff = grid_affine()
    centre = aff[:3, :3] @ np.full(3, 19.5) + aff[:3, 3]  # the label box's centre voxel
    points = np.argwhere(labels == 1) * SPACING_MM + aff[:3, 3]
    return sensor, centre, points


def test_coverage_counts_points_inside_the_collimated_field():
    g = XRayGeometry.from_isocentre([0, 0, 0], [0, 1, 0], field_mm=(100, 100))
    # Field at the isocentre: 100 mm x 530 / 1020 = 52 mm wide; points along x from -50 to 50.
    xs = np.linspace(-50, 50, 1001)
    points = np.stack([xs, np.zeros_like(xs), np.zeros_like(xs)], -1)
    half_iso = 50 * 530 / 1020
    expected = (np.abs(xs) <= half_iso).mean()
    assert coverage_fraction(g, points).item() == pytest.approx(expected, abs=2e-3)
    assert coverage_fraction(g, points[:5] * 0).item() == 1.0
    behind = points + np.array([0, -2000.0, 0])  # behind the source
    assert coverage_fraction(g, behind).item() == 0.0


def test_centring_and_view_angle_errors_are_analytic():
    g = XRayGeometry.from_isocentre([0, 0, 0], [0, 1, 0])
    assert centring_error_mm(g, torch.tensor([[12.0, 30.0, -5.0]])).item() == pytest.approx(13.0)
    theta = math.radians(7.0)
    tilted = XRayGeometry.from_isocentre([0, 0, 0], [0, math.cos(theta), math.sin(theta)])
    err = view_angle_error_deg(tilted, torch.tensor([[0.0, 2.0, 0.0]]))
    assert err.item() == pytest.approx(7.0, abs=1e-3)


def test_cnr_is_the_contrast_over_the_background_std():
    gen = torch.Generator().manual_seed(0)
    image = 100 + 4.0 * torch.randn(1, 64, 64, generator=gen)
    target = torch.zeros(1, 64, 64, dtype=torch.bool)
    target[:, 20:40, 20:40] = True
    image[target] += 12.0
    background = ~target
    cnr = contrast_to_noise(image, target, background).item()
    assert cnr == pytest.approx(3.0, rel=0.1)
    flat = torch.full((1, 64, 64), 50.0)
    flat[target] = 60.0
    assert contrast_to_noise(flat, target, background).item() == pytest.approx(
        10.0 / QUANTISATION_STD
    )
    assert contrast_to_noise(flat, target & False, background).item() == 0.0


def test_scores_reward_the_standard_view_and_penalise_each_fault(bone_in_tissue):
    sensor, centre, points = bone_in_tissue
    geos = [
        XRayGeometry.from_isocentre(centre, [0, 1, 0], pixels=48, detector_mm=200),  # standard
        XRayGeometry.from_isocentre(centre + [25, 0, 0], [0, 1, 0], pixels=48, detector_mm=200),
        XRayGeometry.from_isocentre(centre, [0, 1, 0.4], pixels=48, detector_mm=200),
        XRayGeometry.from_isocentre(
            centre + [0, 0, 60], [0, 1, 0], pixels=48, detector_mm=200, field_mm=(60, 60)
        ),
    ]
    g = XRayGeometry.cat(geos)
    image = sensor.render(g, kvp=80, mas=5.0)
    footprint = sensor.project_labels(g, ["vertebrae_T8"])
    view = XRayViewTarget(centre, [0, 1, 0], points)
    q = xray_image_quality(g, image, footprint, view)
    for name, value in q.as_dict().items():
        assert value.shape == (4,), name
        assert torch.isfinite(value).all(), name
    for name in ("overall", "coverage", "centring", "view_angle", "contrast", "exposure"):
        v = getattr(q, name)
        assert ((v >= 0) & (v <= 1)).all(), name
    assert q.coverage[0] == 1 and q.centring[0] == pytest.approx(1.0)
    assert q.view_angle[0] == pytest.approx(1.0, abs=1e-6)
    assert q.centring_error_mm[1].item() == pytest.approx(25.0, rel=1e-4)
    assert q.centring[1].item() == pytest.approx(2 ** -((25 / 20) ** 2), rel=1e-4)
    assert q.view_angle_error_deg[2].item() == pytest.approx(math.degrees(math.atan(0.4)), 1e-3)
    assert q.coverage[3] == 0 and q.contrast[3] == 0
    assert q.contrast[0] > 0.3
    assert (q.overall[0] > q.overall[1:]).all()


def test_exposure_score_falls_with_too_little_or_too_much_dose(bone_in_tissue):
    sensor, centre, points = bone_in_tissue
    g = XRayGeometry.from_isocentre(centre, [0, 1, 0], pixels=32, detector_mm=150)
    view = XRayViewTarget(centre, [0, 1, 0], points)
    scores = []
    for mas in (0.01, 0.5, 500.0):
        image = sensor.render(g, kvp=80, mas=mas)
        footprint = sensor.project_labels(g, [1])
        scores.append(xray_image_quality(g, image, footprint, view))
    assert scores[0].underexposed_fraction.item() == 1.0 and scores[0].exposure.item() == 0.0
    assert scores[2].overexposed_fraction.item() == 1.0 and scores[2].exposure.item() == 0.0
    assert scores[1].exposure.item() > 0.9


def test_a_batch_scores_like_its_items(bone_in_tissue):
    sensor, centre, points = bone_in_tissue
    g = XRayGeometry.cat(
        [
            XRayGeometry.from_isocentre(centre + [d, 0, 0], [0, 1, 0.1 * d], pixels=32)
            for d in (0.0, 10.0, 20.0)
        ]
    )
    view = XRayViewTarget(centre, [0, 1, 0], points)
    image = sensor.render(g, mas=2.0, noise_seeds=[1, 2, 3])
    footprint = sensor.project_labels(g, [1])
    batch = xray_image_quality(g, image, footprint, view)
    for b in range(3):
        one_image = sensor.render(g[b], mas=2.0, noise_seeds=[b + 1])
        one = xray_image_quality(g[b], one_image, footprint[b : b + 1], view)
        for name, value in one.as_dict().items():
            assert torch.allclose(getattr(batch, name)[b], value[0], rtol=1e-5, atol=1e-6), name


def test_quality_rejects_bad_input(bone_in_tissue):
    sensor, centre, points = bone_in_tissue
    g = XRayGeometry.from_isocentre(centre, [0, 1, 0], pixels=16)
    image = sensor.render(g)
    footprint = sensor.project_labels(g, [1])
    view = XRayViewTarget(centre, [0, 1, 0], points)
    with pytest.raises(ValueError, match="target_footprint_mm must be"):
        xray_image_quality(g, image, footprint[:, :, :8], view)
    with pytest.raises(ValueError, match="non-zero"):
        xray_image_quality(g, image, footprint, XRayViewTarget(centre, [0, 0, 0], points))
    with pytest.raises(ValueError, match="target_centroid_mm"):
        xray_image_quality(g, image, footprint, XRayViewTarget([1, 2], [0, 1, 0], points))
    with pytest.raises(ValueError, match="finite"):
        xray_image_quality(g, image, footprint, XRayViewTarget([np.nan] * 3, [0, 1, 0], points))
    with pytest.raises(ValueError, match="centring_half_mm"):
        XRayQualityParams(centring_half_mm=0)
    with pytest.raises(ValueError, match="kerma_range_ugy"):
        XRayQualityParams(kerma_range_ugy=(5.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        XRayQualityParams(weights={"coverage": 1.0})

"""Ultrasound quality scores: gCNR, plane errors, cross-sections, and behaviour on renders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sonoray.assets.tissues import TISSUE_IDS
from sonoray.sensors import us_quality
from sonoray.sensors.ultrasound import BModeSimulator

SPHERE_ID = 3
SPHERE_CENTRE_MM = np.array([0.0, -60.0, 0.0])
SPHERE_RADIUS_MM = 20.0


def _pose(x=0.0, y=0.0, z=0.0, roll_deg=0.0):
    """Probe +x = patient +x, beam = patient -y, rotated by ``roll_deg`` about the beam."""
    a = math.radians(roll_deg)
    rotation = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], dtype=float)
    about_beam = np.array(
        [[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]]
    )
    pose = np.eye(4)
    pose[:3, :3] = rotation @ about_beam
    pose[:3, 3] = [x, y, z]
    return torch.tensor(pose[None], dtype=torch.float32)


@pytest.fixture(scope="module")
def sphere_scene():
    """Liver block with a kidney-like sphere (label 3) 60 mm under the face at y = 0."""
    spacing = 1.0
    shape = (200, 175, 160)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-100.0, -160.0, -80.0]
    volume = np.full(shape, TISSUE_IDS["liver"], np.int8)
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    xyz = ijk * spacing + affine[:3, 3]
    sphere = np.linalg.norm(xyz - SPHERE_CENTRE_MM, axis=-1) <= SPHERE_RADIUS_MM
    volume[sphere] = TISSUE_IDS["kidney"]
    labels = (sphere * SPHERE_ID).astype(np.int16)
    sim = BModeSimulator(volume, "convex", affine=affine, labels=labels)
    return sim, labels, affine


def test_gcnr_of_known_distributions():
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    left = torch.zeros(16, 16, dtype=torch.bool)
    left[:, :8] = True
    values = torch.arange(128, dtype=torch.uint8).view(8, 16).T  # each of 0..127 once
    image[0, :, :8] = values
    image[0, :, 8:] = values  # same distribution: no contrast
    image[1, :, :8] = values
    image[1, :, 8:] = values + 128  # disjoint: full contrast
    image[2, :, :8] = values
    image[2, :, 8:] = values + 64  # uniform [0,128) vs [64,192): half overlap
    left = left.expand(3, 16, 16)
    g = us_quality.gcnr(image, left, ~left, n_bins=32)
    torch.testing.assert_close(g, torch.tensor([0.0, 1.0, 0.5]))
    empty = torch.zeros_like(left)
    assert torch.all(us_quality.gcnr(image, empty, ~left) == 0)


def test_plane_errors_of_known_poses():
    point, normal, axis = [0.0, -60.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]
    poses = torch.cat([_pose(), _pose(z=7.0), _pose(roll_deg=180.0)])
    tilted = np.eye(4)
    a = math.radians(30.0)
    # Rotate the probe 30 degrees about its beam axis's perpendicular (patient y): plane tilts.
    tilted[:3, :3] = (
        np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        @ _pose()[0, :3, :3].numpy()
    )
    poses = torch.cat([poses, torch.tensor(tilted[None], dtype=torch.float32)])
    distance, plane_angle, lateral_angle = us_quality.plane_errors(poses, point, normal, axis)
    torch.testing.assert_close(distance, torch.tensor([0.0, 7.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        plane_angle, torch.tensor([0.0, 0.0, 0.0, 30.0], dtype=torch.float64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        lateral_angle, torch.tensor([0.0, 0.0, 180.0, 30.0], dtype=torch.float64), atol=1e-3, rtol=0
    )
    _, flipped, _ = us_quality.plane_errors(poses, point, [0.0, 0.0, -2.0])
    torch.testing.assert_close(flipped, plane_angle)


def test_target_area_on_plane_of_a_sphere(sphere_scene):
    _, labels, affine = sphere_scene
    centre_area = us_quality.target_area_on_plane_mm2(
        labels, affine, [SPHERE_ID], SPHERE_CENTRE_MM, [0, 0, 1], spacing_mm=0.5
    )
    offset_area = us_quality.target_area_on_plane_mm2(
        labels, affine, [SPHERE_ID], SPHERE_CENTRE_MM + [0, 0, 12.0], [0, 0, 1], spacing_mm=0.5
    )
    assert centre_area == pytest.approx(math.pi * SPHERE_RADIUS_MM**2, rel=0.03)
    assert offset_area == pytest.approx(math.pi * (SPHERE_RADIUS_MM**2 - 12.0**2), rel=0.05)
    missing = us_quality.target_area_on_plane_mm2(labels, affine, [99], SPHERE_CENTRE_MM, [0, 0, 1])
    assert missing == 0.0


def test_scores_lie_in_unit_interval_and_prefer_the_target_in_view(sphere_scene):
    sim, labels, affine = sphere_scene
    poses = torch.cat([_pose(), _pose(z=10.0), _pose(z=40.0), _pose(x=90.0)])
    coupling = torch.ones(4, 128)
    frame = sim.render(poses, coupling=coupling, target_ids=[SPHERE_ID])
    max_area = us_quality.target_area_on_plane_mm2(
        labels, affine, [SPHERE_ID], SPHERE_CENTRE_MM, [0, 0, 1]
    )
    scores, parts = us_quality.ultrasound_quality(
        frame,
        poses,
        SPHERE_CENTRE_MM,
        [0, 0, 1],
        coupling,
        lateral_axis=[1, 0, 0],
        max_target_area_mm2=max_area,
    )
    assert set(scores) == {"overall", *us_quality.SCORE_NAMES}
    for name, value in scores.items():
        assert value.shape == (4,) and torch.all((value >= 0) & (value <= 1)), name
    centred, offset, out_of_plane, out_of_sector = scores["overall"].tolist()
    assert centred > offset > out_of_plane
    assert centred > out_of_sector
    assert scores["visibility"][0] > 0.9 and scores["visibility"][2] == 0
    assert scores["contrast"][0] > 0.3  # kidney is darker than liver
    assert parts["target_area_mm2"][0] == pytest.approx(math.pi * SPHERE_RADIUS_MM**2, rel=0.05)
    torch.testing.assert_close(parts["distance_mm"], torch.tensor([0.0, 10.0, 40.0, 0.0]))
    assert scores["distance"][1] == pytest.approx(math.exp(-0.5))


def test_visibility_defaults_to_the_cross_section_on_the_current_plane(sphere_scene):
    sim, _, _ = sphere_scene
    frame = sim.render(torch.cat([_pose(), _pose(z=12.0)]), target_ids=[SPHERE_ID])
    scores, parts = us_quality.ultrasound_quality(frame, torch.cat([_pose(), _pose(z=12.0)]))
    assert "distance" not in scores and "coupling" in scores
    # The cut 12 mm off-centre is smaller but wholly in the sector: fully visible.
    assert torch.all(scores["visibility"] > 0.9)
    expected = torch.tensor([SPHERE_RADIUS_MM**2, SPHERE_RADIUS_MM**2 - 12.0**2]) * math.pi
    torch.testing.assert_close(frame.target_plane_area_mm2, expected, rtol=0.1, atol=0)


def test_uncoupled_aperture_scores_low(sphere_scene):
    sim, _, _ = sphere_scene
    coupling = torch.zeros(1, 128)
    frame = sim.render(_pose(), coupling=coupling, target_ids=[SPHERE_ID])
    scores = us_quality.ultrasound_scores(frame, _pose(), SPHERE_CENTRE_MM, [0, 0, 1], coupling)
    assert scores["coupling"][0] == 0 and scores["overall"][0] == 0
    assert scores["confidence"][0] == 0


def test_bad_quality_inputs_raise(sphere_scene):
    sim, labels, affine = sphere_scene
    frame = sim.render(_pose())
    with pytest.raises(ValueError, match="render it with target_ids"):
        us_quality.ultrasound_quality(frame, _pose())
    frame = sim.render(_pose(), target_ids=[SPHERE_ID])
    with pytest.raises(ValueError, match="plane_normal must be non-zero"):
        us_quality.ultrasound_quality(frame, _pose(), SPHERE_CENTRE_MM, [0, 0, 0])
    with pytest.raises(ValueError, match="both plane_point_mm and plane_normal"):
        us_quality.ultrasound_quality(frame, _pose(), SPHERE_CENTRE_MM)
    with pytest.raises(ValueError, match="coupling must be"):
        us_quality.ultrasound_quality(frame, _pose(), coupling=torch.ones(2, 128))
    with pytest.raises(ValueError, match="max_target_area_mm2"):
        us_quality.ultrasound_quality(frame, _pose(), max_target_area_mm2=-1.0)
    with pytest.raises(ValueError, match=r"probe_in_patient must be finite \(B, 4, 4\)"):
        us_quality.plane_errors(torch.eye(3), SPHERE_CENTRE_MM, [0, 0, 1])
    with pytest.raises(ValueError, match="distance_scale_mm"):
        us_quality.QualityConfig(distance_scale_mm=0.0)
    with pytest.raises(ValueError, match="n_bins"):
        us_quality.QualityConfig(n_bins=1)
    with pytest.raises(ValueError, match="unknown score weights"):
        us_quality.QualityConfig(weights={"sharpness": 1.0})
    with pytest.raises(ValueError, match="spacing_mm"):
        us_quality.target_area_on_plane_mm2(
            labels, affine, [3], SPHERE_CENTRE_MM, [0, 0, 1], spacing_mm=0
        )

"""B-mode sensor: geometry, reflection, attenuation, shadowing, speckle, coupling, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sonoray.assets import tissues
from sonoray.sensors import probes
from sonoray.sensors.ultrasound import BModeSettings, BModeSimulator, check_probe_poses

TISSUE_IDS = tissues.TISSUE_IDS


def _slab(layers, spacing_mm=0.5, lateral_mm=260.0, depth_mm=170.0, elevation_mm=40.0):
    """Tissue ids of horizontal layers; the probe face sits at y = 0 and looks along -y.

    Args:
        layers: ``[(top_depth_mm, tissue_name), ...]`` in increasing depth; the first
            layer also fills the 15 mm above the face so every scan line starts in it.

    Returns:
        ``(tissue_ids (I, J, K) int8, affine (4, 4))``; x lateral, y up, z elevation.
    """
    shape = (
        int(lateral_mm / spacing_mm),
        int((depth_mm + 15.0) / spacing_mm),
        int(elevation_mm / spacing_mm),
    )
    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = [-lateral_mm / 2, -depth_mm, -elevation_mm / 2]
    depth = -(affine[1, 3] + spacing_mm * np.arange(shape[1]))  # depth below the face per j
    column = np.full(shape[1], TISSUE_IDS[layers[0][1]], np.int8)
    for top_mm, name in layers:
        column[depth >= top_mm] = TISSUE_IDS[name]
    return np.broadcast_to(column[None, :, None], shape).copy(), affine


def _pose(x=0.0, y=0.0, z=0.0, batch=1):
    """Probe poses: probe +x = patient +x, beam (+z) = patient -y, elevation = patient +z."""
    pose = np.eye(4)
    pose[:3, :3] = [[1, 0, 0], [0, 0, -1], [0, 1, 0]]
    pose[:3, 3] = [x, y, z]
    return torch.tensor(np.repeat(pose[None], batch, 0), dtype=torch.float32)


def _centre_column(sim: BModeSimulator) -> int:
    return int(sim.pixel_positions_mm[0, :, 0].abs().argmin())


# ----- presets -------------------------------------------------------------------------------


def test_presets_follow_the_published_probes():
    convex, linear = probes.get_preset("convex"), probes.get_preset("linear")
    assert convex.center_frequency_mhz == pytest.approx(3.5, abs=0.1)
    assert convex.radius_mm == pytest.approx(50.0, abs=1.0)
    assert 70.0 <= convex.field_of_view_deg <= 76.0
    assert convex.depth_mm == 150.0 and convex.n_elements == linear.n_elements == 128
    assert linear.center_frequency_mhz == pytest.approx(7.5, abs=0.2)
    assert linear.aperture_mm == pytest.approx(38.4)
    assert linear.depth_mm == 60.0 and not linear.is_convex
    # A Gaussian pulse of bandwidth B f_c has an axial -6 dB width c / (2 B f_c) x 0.88...
    fwhm = convex.axial_sigma_mm * probes.FWHM_PER_SIGMA
    assert fwhm == pytest.approx(2 * math.log(2) / math.pi * 1.54 / (0.79 * 3.57), rel=1e-6)


def test_unknown_preset_raises_with_known_names():
    with pytest.raises(ValueError, match="convex"):
        probes.get_preset("phased")
    with pytest.raises(ValueError, match="unknown probe preset"):
        BModeSimulator(np.zeros((4, 4, 4), np.int8), "phased", affine=np.eye(4))


def test_scan_lines_start_on_the_face_and_fan_from_the_marker_side():
    origins, directions = probes.scan_lines("convex")
    radius = probes.PRESETS["convex"].radius_mm
    centre = torch.tensor([0.0, 0.0, -radius], dtype=torch.float64)
    torch.testing.assert_close(
        (origins - centre).norm(dim=-1), torch.full((128,), radius, dtype=torch.float64)
    )
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(128, dtype=torch.float64))
    assert origins[0, 0] < 0 < origins[-1, 0] and directions[0, 0] < 0 < directions[-1, 0]
    half_fov = math.degrees(math.atan2(directions[-1, 0], directions[-1, 2]))
    assert half_fov == pytest.approx(0.5 * 127 / 128 * probes.PRESETS["convex"].field_of_view_deg)
    origins, directions = probes.scan_lines("linear")
    assert torch.all(directions[:, 2] == 1) and torch.all(origins[:, 2] == 0)
    assert float(origins[-1, 0] - origins[0, 0]) == pytest.approx(127 * 0.3)
    assert probes.element_positions_mm("linear").shape == (128, 3)


# ----- physics along a line ------------------------------------------------------------------


@pytest.mark.parametrize("preset, depth_mm", [("convex", 80.0), ("linear", 30.0)])
def test_planar_interface_echoes_at_its_depth(preset, depth_mm):
    volume, affine = _slab([(0.0, "fat"), (depth_mm, "muscle")])
    sim = BModeSimulator(volume, preset, affine=affine, settings=BModeSettings(speckle=False))
    frame = sim.render(_pose())
    column = _centre_column(sim)
    row = int(frame.image[0, 10:, column].argmax()) + 10  # skip the face echo
    echo_depth_mm = float(sim.pixel_positions_mm[row, column, 2])
    assert abs(echo_depth_mm - depth_mm) <= 2.0 * sim.pixel_size_mm[0]


def test_echo_amplitudes_follow_the_reflection_coefficients():
    preset = probes.get_preset("linear")
    d1, d2 = 20.0, 40.0
    volume, affine = _slab([(0.0, "liver"), (d1, "fat"), (d2, "muscle")], spacing_mm=0.25)
    settings = BModeSettings(speckle=False, tgc_db_cm_mhz=None)
    sim = BModeSimulator(volume, preset, affine=affine, settings=settings)
    envelope = sim.render(_pose()).envelope[0, 64]

    def z(name):
        return tissues.tissue(name).impedance_mrayl

    def alpha(name):
        return tissues.tissue(name).attenuation_db_cm_mhz

    r0 = (z("liver") - z("water")) / (z("liver") + z("water"))  # lens (gel) -> liver at the face
    r1 = (z("fat") - z("liver")) / (z("fat") + z("liver"))
    r2 = (z("muscle") - z("fat")) / (z("muscle") + z("fat"))
    dz = sim.sample_spacing_mm
    j1 = int(envelope[int(10 / dz) : int(30 / dz)].argmax()) + int(10 / dz)
    j2 = int(envelope[int(30 / dz) : int(50 / dz)].argmax()) + int(30 / dz)
    assert abs(j1 * dz - d1) < 0.5 and abs(j2 * dz - d2) < 0.5
    f = preset.center_frequency_mhz
    # Round-trip amplitude: 10^(-2 alpha f z / 20); transmission (1 - R) per interface above.
    expected_1 = abs(r1) * (1 - r0**2) * 10 ** (-alpha("liver") * f * (j1 * dz / 10) / 10)
    expected_ratio = (
        abs(r2) / abs(r1) * (1 - r1**2) * 10 ** (-alpha("fat") * f * ((j2 - j1) * dz / 10) / 10)
    )
    assert float(envelope[j1]) == pytest.approx(expected_1, rel=1e-3)
    assert float(envelope[j2] / envelope[j1]) == pytest.approx(expected_ratio, rel=1e-3)


@pytest.mark.parametrize("preset", ["convex", "linear"])
def test_brightness_falls_at_twice_alpha_f_db_per_cm_without_gain_compensation(preset):
    p = probes.get_preset(preset)
    volume, affine = _slab([(0.0, "liver")], spacing_mm=1.0, depth_mm=p.depth_mm + 5)
    sim = BModeSimulator(volume, p, affine=affine, settings=BModeSettings(tgc_db_cm_mhz=None))
    poses = torch.cat([_pose(z=z) for z in np.linspace(-10, 10, 9)])
    frame = sim.render(poses)
    db = 20 * torch.log10(frame.envelope[:, 16:-16]).mean(dim=(0, 1))  # (S,)
    depth_cm = sim.sample_depths_mm.double() / 10
    keep = (depth_cm > 0.15 * p.depth_mm / 10) & (depth_cm < 0.95 * p.depth_mm / 10)
    slope = np.polyfit(depth_cm[keep].numpy(), db[keep].double().numpy(), 1)[0]
    expected = -2 * tissues.tissue("liver").attenuation_db_cm_mhz * p.center_frequency_mhz
    assert slope == pytest.approx(expected, rel=0.1)


@pytest.mark.parametrize("blocker", ["cortical_bone", "air", "lung"])
def test_bone_and_gas_shadow_what_lies_beneath(blocker):
    clear_volume, affine = _slab([(0.0, "liver")], spacing_mm=1.0)
    blocked_volume, _ = _slab([(0.0, "liver"), (40.0, blocker), (46.0, "liver")], spacing_mm=1.0)
    clear = BModeSimulator(clear_volume, "convex", affine=affine).render(_pose())
    blocked = BModeSimulator(blocked_volume, "convex", affine=affine).render(_pose())
    sim = BModeSimulator(clear_volume, "convex", affine=affine)
    below = sim.sector_mask & (sim.pixel_positions_mm[..., 2] > 60.0)
    assert blocked.image[0][below].float().mean() < 0.1 * clear.image[0][below].float().mean()
    assert blocked.confidence[0][below].max() < 1e-3 < clear.confidence[0][below].min()
    above = sim.sector_mask & (sim.pixel_positions_mm[..., 2] < 30.0)
    torch.testing.assert_close(blocked.image[0][above], clear.image[0][above], atol=1, rtol=0)


def test_fully_developed_speckle_has_rayleigh_mean_over_std():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=1.0)
    sim = BModeSimulator(volume, "convex", affine=affine)  # default TGC compensates liver
    poses = torch.cat([_pose(z=z) for z in (-8.0, 0.0, 8.0)])
    envelope = sim.render(poses).envelope[:, 8:-8, int(20 / sim.sample_spacing_mm) : -8]
    ratio = float(envelope.mean() / envelope.std())
    assert ratio == pytest.approx(1.91, rel=0.1)


def test_uncoupled_lines_are_dark():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=1.0)
    sim = BModeSimulator(volume, "convex", affine=affine)
    coupling = torch.ones(1, 128)
    coupling[:, :64] = 0.0
    frame = sim.render(_pose(), coupling=coupling)
    full = sim.render(_pose())
    x = sim.pixel_positions_mm[..., 0]
    left = sim.sector_mask & (x < -5.0)
    right = sim.sector_mask & (x > 5.0)
    assert frame.image[0][left].max() == 0 and frame.confidence[0][left].max() == 0
    torch.testing.assert_close(frame.image[0][right], full.image[0][right], atol=1, rtol=0)
    boolean = sim.render(_pose(), coupling=coupling.bool())
    assert torch.equal(boolean.image, frame.image)


def test_probe_in_air_sees_only_its_face():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=1.0)
    sim = BModeSimulator(volume, "linear", affine=affine)
    frame = sim.render(_pose(y=40.0))  # 25 mm of air between the face and the tissue
    depth_mm = sim.pixel_positions_mm[..., 2]
    assert frame.image[0][sim.sector_mask & (depth_mm > 2.0)].max() == 0
    assert frame.image[0][sim.sector_mask & (depth_mm < 0.5)].min() == 255  # lens/air, R ~ 1


def test_gel_fills_a_small_gap_to_the_skin():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=0.5)
    sim = BModeSimulator(volume, "linear", affine=affine)
    touching = sim.render(_pose(y=0.0)).image.float().mean()
    gap = sim.render(_pose(y=16.0)).image.float().mean()  # 1 mm of air above the tissue
    assert gap > 0.8 * touching


# ----- speckle coherence ---------------------------------------------------------------------


def _speckle_correlation(sim, shift):
    base = sim.render(_pose())
    moved = sim.render(_pose(*shift))
    region = sim.sector_mask & (sim.pixel_positions_mm[..., 2] > 15.0)
    a, b = base.image[0][region].double(), moved.image[0][region].double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@pytest.mark.parametrize("preset", ["convex", "linear"])
def test_speckle_stays_correlated_for_small_moves_and_not_for_large(preset):
    volume, affine = _slab([(0.0, "liver")], spacing_mm=1.0)
    sim = BModeSimulator(volume, preset, affine=affine)
    for axis in range(3):
        small = [0.0, 0.0, 0.0]
        small[axis] = 0.2
        large = [0.0, 0.0, 0.0]
        large[axis] = 10.0
        assert _speckle_correlation(sim, small) > 0.8, (axis, "0.2 mm")
        assert _speckle_correlation(sim, large) < 0.2, (axis, "10 mm")


def test_speckle_is_deterministic_and_seeded():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=1.0)
    a = BModeSimulator(volume, "linear", affine=affine).render(_pose()).image
    b = BModeSimulator(volume, "linear", affine=affine).render(_pose()).image
    seeded = BModeSettings(speckle_seed=1)
    c = BModeSimulator(volume, "linear", affine=affine, settings=seeded).render(_pose()).image
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----- batching, targets, devices ------------------------------------------------------------


def test_batch_equals_single_calls():
    volume, affine = _slab([(0.0, "fat"), (20.0, "liver"), (70.0, "kidney")], spacing_mm=1.0)
    sim = BModeSimulator(volume, "convex", affine=affine)
    poses = torch.cat([_pose(x=-6.0), _pose(z=3.0), _pose(y=-2.0)])
    coupling = torch.rand(3, 128, generator=torch.Generator().manual_seed(0))
    batch = sim.render(poses, coupling=coupling)
    for i in range(3):
        single = sim.render(poses[i : i + 1], coupling=coupling[i : i + 1])
        torch.testing.assert_close(batch.envelope[i], single.envelope[0], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(batch.confidence[i], single.confidence[0], rtol=1e-5, atol=1e-7)
        assert (batch.image[i].int() - single.image[0].int()).abs().max() <= 1


def test_batch_of_volumes_equals_one_simulator_per_volume():
    first, affine = _slab([(0.0, "liver")], spacing_mm=1.0)
    second, _ = _slab([(0.0, "fat"), (30.0, "muscle")], spacing_mm=1.0)
    both = BModeSimulator(
        np.stack([first, second]), "linear", affine=affine, settings=BModeSettings(speckle=False)
    )
    frames = both.render(torch.cat([_pose(), _pose()]))
    for i, volume in enumerate((first, second)):
        alone = BModeSimulator(
            volume, "linear", affine=affine, settings=BModeSettings(speckle=False)
        )
        torch.testing.assert_close(frames.envelope[i], alone.render(_pose()).envelope[0])
    swapped = both.render(torch.cat([_pose(), _pose()]), volume_index=[1, 0])
    torch.testing.assert_close(swapped.envelope[0], frames.envelope[1])


def test_target_mask_has_the_cross_section_of_a_sphere():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=0.5, lateral_mm=100, depth_mm=100)
    axes = [affine[a, a] * np.arange(n) + affine[a, 3] for a, n in enumerate(volume.shape)]
    x, y, z = np.ix_(*axes)
    radius_mm = 20.0
    sphere = (x - 10.0) ** 2 + (y + 70.0) ** 2 + z**2 <= radius_mm**2
    labels = sphere.astype(np.int16) * 7
    volume[sphere] = TISSUE_IDS["kidney"]
    sim = BModeSimulator(volume, "convex", affine=affine, labels=labels)
    frame = sim.render(torch.cat([_pose(), _pose(z=12.0)]), target_ids=[7])
    area_mm2 = frame.target_mask.sum(dim=(1, 2)).double() * math.prod(sim.pixel_size_mm)
    expected = torch.tensor([math.pi * radius_mm**2, math.pi * (radius_mm**2 - 12.0**2)])
    torch.testing.assert_close(area_mm2, expected.double(), rtol=0.05, atol=0)
    assert not (frame.target_mask & ~sim.sector_mask).any()
    inside = frame.image[0][frame.target_mask[0]].float().mean()
    x_mm, z_mm = sim.pixel_positions_mm[..., 0], sim.pixel_positions_mm[..., 2]
    near = ((x_mm - 10.0).abs() < 45.0) & ((z_mm - 70.0).abs() < 15.0)  # beside, not beneath
    outside = frame.image[0][sim.sector_mask & near & ~frame.target_mask[0]].float().mean()
    assert inside < outside  # kidney is less echogenic than liver


def test_image_shape_dtype_and_sector():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=1.0)
    settings = BModeSettings(image_shape=(96, 160))
    sim = BModeSimulator(volume, "convex", affine=affine, settings=settings)
    frame = sim.render(_pose(batch=2))
    assert frame.image.shape == (2, 96, 160) and frame.image.dtype == torch.uint8
    assert frame.confidence.shape == (2, 96, 160) and frame.target_mask is None
    assert frame.envelope.shape == (2, 128, sim.n_samples)
    assert frame.image[:, ~sim.sector_mask].max() == 0
    assert frame.image[:, sim.sector_mask].float().mean() > 40
    assert sim.sector_mask[0].any() and not sim.sector_mask[0, 0]  # fan apex at the top
    assert sim.pixel_size_mm[0] == pytest.approx(sim.pixel_size_mm[1])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    volume, affine = _slab([(0.0, "fat"), (20.0, "liver")], spacing_mm=1.0)
    cpu = BModeSimulator(volume, "convex", affine=affine).render(_pose())
    gpu = BModeSimulator(volume, "convex", affine=affine, device="cuda").render(_pose())
    torch.testing.assert_close(gpu.envelope.cpu(), cpu.envelope, rtol=1e-4, atol=1e-9)


# ----- bad input -----------------------------------------------------------------------------


def _sim():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=2.0, lateral_mm=80, depth_mm=60)
    return BModeSimulator(volume, "linear", affine=affine)


@pytest.mark.parametrize(
    "pose, message",
    [
        (torch.eye(4), r"shape \(B, 4, 4\)"),
        (torch.eye(4)[None, :3], r"shape \(B, 4, 4\)"),
        (torch.full((1, 4, 4), float("nan")), "NaN"),
        (torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0]))[None], "not a proper rotation"),
        (torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0]))[None], "not a proper rotation"),
        (torch.cat([torch.eye(4)[:3], torch.ones(1, 4)])[None], "last row"),
    ],
)
def test_bad_poses_raise(pose, message):
    with pytest.raises(ValueError, match=message):
        _sim().render(pose)
    with pytest.raises(ValueError, match=message):
        check_probe_poses(pose)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth_mm": 0.0}, "depth_mm"),
        ({"depth_mm": -5.0}, "depth_mm"),
        ({"dynamic_range_db": 0.0}, "dynamic_range_db"),
        ({"dynamic_range_db": float("nan")}, "dynamic_range_db"),
        ({"image_shape": (128,)}, "image_shape"),
        ({"image_shape": (0, 128)}, "image_shape"),
        ({"samples_per_pixel": 0.0}, "samples_per_pixel"),
        ({"tgc_db_cm_mhz": -1.0}, "tgc_db_cm_mhz"),
        ({"gain_db": float("inf")}, "gain_db"),
        ({"coupling_gel_mm": -1.0}, "coupling_gel_mm"),
    ],
)
def test_bad_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BModeSettings(**kwargs)


def test_bad_volumes_and_render_arguments_raise():
    volume, affine = _slab([(0.0, "liver")], spacing_mm=2.0, lateral_mm=80, depth_mm=60)
    with pytest.raises(ValueError, match="affine"):
        BModeSimulator(volume, "linear")
    with pytest.raises(ValueError, match="affine must be finite and invertible"):
        BModeSimulator(volume, "linear", affine=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="tissue ids must lie in"):
        BModeSimulator(volume * 0 + 99, "linear", affine=affine)
    with pytest.raises(ValueError, match="integers"):
        BModeSimulator(volume.astype(np.float32), "linear", affine=affine)
    with pytest.raises(ValueError, match="labels shape"):
        BModeSimulator(volume, "linear", affine=affine, labels=np.zeros((2, 2, 2)))
    sim = BModeSimulator(volume, "linear", affine=affine)
    with pytest.raises(ValueError, match=r"coupling must have shape \(1, 128\)"):
        sim.render(_pose(), coupling=torch.ones(1, 64))
    with pytest.raises(ValueError, match=r"coupling must lie in \[0, 1\]"):
        sim.render(_pose(), coupling=torch.full((1, 128), 2.0))
    with pytest.raises(ValueError, match="target_ids need a label volume"):
        sim.render(_pose(), target_ids=[1])
    with pytest.raises(ValueError, match="volume_index"):
        sim.render(_pose(), volume_index=[3])


# ----- example CT ----------------------------------------------------------------------------


def _skin_pose(patient, inside_mm, direction, lateral, press_mm):
    """Probe on the skin where a ray from ``inside_mm`` leaves the body, beam along the
    inward skin normal (from the smoothed body mask), pressed ``press_mm`` into the skin."""
    from scipy import ndimage

    inverse = np.linalg.inv(patient.affine)
    step = np.asarray(direction, float) / np.linalg.norm(direction)
    for distance in np.arange(0.0, 300.0, 0.5):
        point = inside_mm + distance * step
        ijk = tuple(np.floor(point @ inverse[:3, :3].T + inverse[:3, 3] + 0.5).astype(int))
        if not patient.body_mask[ijk]:
            break
    smooth = ndimage.gaussian_filter(patient.body_mask.astype(np.float32), 2.0)
    gradient = np.array([g[ijk] for g in np.gradient(smooth)])
    outward = -(patient.affine[:3, :3] @ gradient)
    outward /= np.linalg.norm(outward)
    x_axis = np.asarray(lateral, float) - (np.asarray(lateral, float) @ outward) * outward
    x_axis /= np.linalg.norm(x_axis)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 2] = x_axis, -outward
    pose[:3, 1] = np.cross(-outward, x_axis)
    pose[:3, 3] = point - press_mm * outward
    return pose


@pytest.fixture(scope="module")
def chest_patient(chest_ct_path):
    from sonoray.assets.ct import load_example_ct

    return load_example_ct(chest_ct_path, spacing_mm=1.5)


@pytest.mark.slow
@pytest.mark.chest_ct
@pytest.mark.parametrize("preset", ["convex", "linear"])
def test_liver_through_the_right_flank_of_the_example_ct(chest_patient, preset):
    from sonoray.sensors import us_quality

    patient = chest_patient
    liver_ids = patient.structure_ids("liver")
    centroid = patient.centroid_mm("liver")
    # Right flank, 45 mm below the liver's centroid, transverse plane with the marker towards
    # the patient's right (image +x towards the left).
    right = np.array([1.0, 0.0, 0.0])
    lateral = np.cross([0.0, 0.0, 1.0], right)
    pose = _skin_pose(patient, centroid + [0.0, 0.0, -45.0], right, lateral, press_mm=8.0)
    pose = torch.tensor(pose[None], dtype=torch.float32)
    sim = BModeSimulator(patient, preset)
    frame = sim.render(pose, target_ids=liver_ids)
    scores, parts = us_quality.ultrasound_quality(frame, pose)
    liver_pixels = frame.image[0][frame.target_mask[0]].float()
    assert parts["target_area_mm2"][0] > (1500.0 if preset == "convex" else 800.0)
    assert 40.0 < liver_pixels.mean() < 200.0  # parenchyma is mid-grey, not black or white
    assert scores["visibility"][0] > 0.5 and scores["confidence"][0] > 0.3

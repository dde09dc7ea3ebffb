"""X-ray sensor: geometry, line integrals, physics, noise, dose, label projection.

Physics is checked against analytic values (monoenergetic mode gives exp(-mu L) exactly).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sonoray.assets import tissues
from sonoray.sensors import dose, xray_physics
from sonoray.sensors.drr import VolumeProjector, XRaySensor, line_integrals, material_densities
from sonoray.sensors.xray_geometry import XRayGeometry, display_axes

SPACING_MM = 2.0
N = 40  # voxels per axis of the synthetic volumes


def grid_affine(n=N, spacing=SPACING_MM) -> np.ndarray:
    """RAS affine of an n^3 grid centred on the origin."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -(n - 1) / 2 * spacing
    return aff


def ap_geometry(pixels=33, detector_mm=150.0, **kw) -> XRayGeometry:
    """AP exposure (beam posterior -> anterior) through the origin."""
    return XRayGeometry.from_isocentre(
        [0, 0, 0], [0, 1, 0], pixels=pixels, detector_mm=detector_mm, **kw
    )


def soft_cube(side_vox: int, hu: float = 0.0, background: float = -1024.0) -> np.ndarray:
    vol = np.full((N, N, N), background, dtype=np.float32)
    a = (N - side_vox) // 2
    vol[a : a + side_vox, a : a + side_vox, a : a + side_vox] = hu
    return vol


def ray_box_hits(geometry: XRayGeometry, box_lo_mm, box_hi_mm) -> np.ndarray:
    """(B, rows, cols) bool: rays source -> pixel that cross an axis-aligned box (slab test)."""
    src = geometry.source_mm.numpy()[:, None, None, :]
    d = geometry.pixel_centres_mm().numpy() - src
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = (np.asarray(box_lo_mm) - src) / d
        t1 = (np.asarray(box_hi_mm) - src) / d
    near = np.nanmax(np.minimum(t0, t1), axis=-1)
    far = np.nanmin(np.maximum(t0, t1), axis=-1)
    return (far >= np.maximum(near, 0)) & (near <= 1)


# ----- geometry ---------------------------------------------------------------------------


def test_projection_matrix_maps_pixel_centres_to_their_indices():
    g = XRayGeometry.from_isocentre([10, -5, 3], [0.3, 1, 0.2], pixels=9)
    centres = g.pixel_centres_mm()[0]  # (9, 9, 3)
    uv = g.project(centres.reshape(-1, 3))[0].reshape(9, 9, 2)
    rows, cols = torch.meshgrid(torch.arange(9.0), torch.arange(9.0), indexing="ij")
    assert torch.allclose(uv[..., 0], cols, atol=1e-3)
    assert torch.allclose(uv[..., 1], rows, atol=1e-3)
    # Any point on a ray projects onto that ray's pixel.
    mid = (g.source_mm[0] + centres[2, 7]) / 2
    assert torch.allclose(g.project(mid[None])[0, 0], torch.tensor([7.0, 2.0]), atol=1e-3)
    assert g.projection_matrix().shape == (1, 3, 4)


def test_point_landmark_projects_onto_the_pixel_where_its_blob_appears():
    point = np.array([14.0, -6.0, -22.0])
    ijk = np.stack(np.meshgrid(*[np.arange(N)] * 3, indexing="ij"), -1).astype(np.float64)
    aff = grid_affine()
    xyz = ijk * SPACING_MM + aff[:3, 3]
    blob = np.exp(-((xyz - point) ** 2).sum(-1) / (2 * 2.5**2)).astype(np.float32)
    g = XRayGeometry.from_isocentre([0, 0, 0], [0.4, 1, -0.3], pixels=65, detector_mm=200)
    img = line_integrals(torch.from_numpy(blob)[None], aff, g)[0, 0]
    row, col = divmod(int(img.argmax()), g.cols)
    u, v = g.project(torch.tensor(point)[None])[0, 0].tolist()
    assert abs(u - col) <= 0.5 + 1e-3 and abs(v - row) <= 0.5 + 1e-3


def test_display_axes_follow_the_radiographic_convention():
    ap_row, ap_col = display_axes(torch.tensor([0.0, 1.0, 0.0]))  # AP: beam to anterior
    pa_row, pa_col = display_axes(torch.tensor([0.0, -1.0, 0.0]))
    for row, col in ((ap_row, ap_col), (pa_row, pa_col)):
        assert torch.allclose(row[0], torch.tensor([0.0, 0.0, -1.0]))  # head up
        assert torch.allclose(col[0], torch.tensor([-1.0, 0.0, 0.0]))  # patient's right left
    lat_row, lat_col = display_axes(torch.tensor([-1.0, 0.0, 0.0]))  # detector on the left
    assert torch.allclose(lat_row[0], torch.tensor([0.0, 0.0, -1.0]))
    assert torch.allclose(lat_col[0], torch.tensor([0.0, -1.0, 0.0]))  # anterior on the left


def test_rendered_views_show_right_on_the_left_and_head_up():
    # Markers: patient's right (+x), superior (+z), anterior (+y).
    hu = np.full((N, N, N), -1024.0, dtype=np.float32)
    aff = grid_affine()
    for point in ([24, 0, 0], [0, 0, 24], [0, 24, 0]):
        i, j, k = np.round((np.array(point) - aff[:3, 3]) / SPACING_MM).astype(int)
        hu[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] = 1500.0
    sensor = XRaySensor(hu, aff)
    g = XRayGeometry.cat(
        [
            XRayGeometry.from_isocentre([0, 0, 0], beam, pixels=33, detector_mm=150)
            for beam in ([0, 1, 0], [0, -1, 0], [-1, 0, 0])
        ]
    )
    att = sensor.render(g, monoenergetic_kev=60).attenuation[:, 0]
    for b in (0, 1):  # AP and PA: right marker on the viewer's left, superior marker on top
        right = g[b].project(torch.tensor([[24.0, 0, 0]]))[0, 0]
        top = g[b].project(torch.tensor([[0.0, 0, 24]]))[0, 0]
        assert right[0] < 16 and top[1] < 16
        assert att[b, int(right[1].round()), int(right[0].round())] > 0.1
    front = g[2].project(torch.tensor([[0.0, 24, 0]]))[0, 0]  # lateral: anterior on the left
    assert front[0] < 16 and att[2, int(front[1].round()), int(front[0].round())] > 0.1


def test_geometry_batches_and_slices():
    g = XRayGeometry.cat([ap_geometry(), ap_geometry(field_mm=(50, 60))])
    assert g.batch_size == 2 and g[1].field_mm.tolist() == [[50.0, 60.0]]
    assert torch.equal(g[0].source_mm, g.source_mm[:1])


# ----- line integrals -----------------------------------------------------------------------


@pytest.mark.parametrize("beam", [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0], [1, -1, 1]])
def test_line_integral_of_a_uniform_box_is_the_chord(beam):
    g = XRayGeometry.from_isocentre([0, 0, 0], beam, pixels=17, detector_mm=20)
    chord = N * SPACING_MM / np.abs(np.array(beam, float) / np.linalg.norm(beam)).max()
    out = line_integrals(
        torch.ones(2, N, N, N) * torch.tensor([1.0, 3.0])[:, None, None, None], grid_affine(), g
    )
    assert out.shape == (1, 2, 17, 17)
    assert out[0, 0, 8, 8].item() == pytest.approx(chord, rel=1e-4)
    assert out[0, 1, 8, 8].item() == pytest.approx(3 * chord, rel=1e-4)


def test_one_volume_per_batch_item():
    g = XRayGeometry.cat([ap_geometry(pixels=9, detector_mm=20)] * 3)
    vols = torch.ones(3, 1, N, N, N) * torch.tensor([1.0, 2.0, 5.0])[:, None, None, None, None]
    out = line_integrals(vols, grid_affine(), g)[:, 0, 4, 4]
    assert torch.allclose(out, torch.tensor([1.0, 2.0, 5.0]) * N * SPACING_MM, rtol=1e-4)
    picked = VolumeProjector(vols, grid_affine()).line_integrals(g, volume_index=[2, 2, 0])
    assert torch.allclose(
        picked[:, 0, 4, 4], torch.tensor([5.0, 5.0, 1.0]) * N * SPACING_MM, rtol=1e-4
    )


@pytest.mark.parametrize("slab", [(4, 4, 4), (3, 5, 2)])
@pytest.mark.parametrize("beam", [[0, 1, 0], [1, -1, 1], [0.2, 1, 0.1]])
def test_slab_averaging_keeps_chords_exact_and_volumes_apart(slab, beam):
    # Two volumes side by side in the plane stacks: thick slabs must not mix them.
    vols = torch.ones(2, 1, N, N, N) * torch.tensor([1.0, 4.0])[:, None, None, None, None]
    g = XRayGeometry.cat(
        [XRayGeometry.from_isocentre([0, 0, 0], beam, pixels=17, detector_mm=60)] * 2
    )
    chord = N * SPACING_MM / np.abs(np.array(beam, float) / np.linalg.norm(beam)).max()
    out = VolumeProjector(vols, grid_affine(), slab).line_integrals(g)[:, 0, 8, 8]
    assert torch.allclose(out, torch.tensor([1.0, 4.0]) * chord, rtol=1e-4)
    g = XRayGeometry.from_carm([0, -10, 0], [0, 500, 0], [0, 0, -1], [-1, 0, 0], 1.0, 3, 3)
    inside = VolumeProjector(vols[:1], grid_affine(), slab).line_integrals(g)[0, 0, 1, 1]
    assert inside.item() == pytest.approx(N + 10, rel=1e-4)


def test_slabs_across_a_near_axial_beam_match_exact_sampling_on_smooth_anatomy():
    rng = np.random.default_rng(3)
    noise = torch.from_numpy(rng.random((1, 1, N, N, N)).astype(np.float32))
    smooth = torch.nn.functional.avg_pool3d(noise, 5, stride=1, padding=2)[0]
    g = XRayGeometry.from_isocentre([0, 0, 0], [0.1, 1, -0.15], pixels=24, detector_mm=150)
    exact = line_integrals(smooth, grid_affine(), g)
    slabs = VolumeProjector(smooth, grid_affine(), (4, 4, 4)).line_integrals(g)
    hit = exact > 1.0
    error = ((slabs - exact).abs() / exact)[hit]
    assert error.mean() < 2e-3 and error.max() < 0.03
    # An oblique exposure falls back to plane-by-plane sampling, also inside a batch.
    oblique = XRayGeometry.from_isocentre([0, 0, 0], [0.6, 1, 0], pixels=24, detector_mm=150)
    both = XRayGeometry.cat([g, oblique])
    batch = VolumeProjector(smooth, grid_affine(), (4, 4, 4)).line_integrals(both)
    assert torch.equal(batch[1], line_integrals(smooth, grid_affine(), oblique)[0])
    assert torch.allclose(batch[0], slabs[0], rtol=1e-5)
    with pytest.raises(ValueError, match="slab_voxels"):
        VolumeProjector(smooth, grid_affine(), (0, 1, 1))
    with pytest.raises(ValueError, match="slab_voxels"):
        VolumeProjector(smooth, grid_affine(), (1.5, 1, 1))


def test_source_or_detector_inside_the_volume_integrates_only_between_them():
    vol, aff = torch.ones(1, N, N, N), grid_affine()
    half = N * SPACING_MM / 2  # box from -40 to 40 mm
    # Source inside at y = -10, detector outside: from -10 to the exit at +40.
    g = XRayGeometry.from_carm([0, -10, 0], [0, 500, 0], [0, 0, -1], [-1, 0, 0], 1.0, 3, 3)
    assert line_integrals(vol, aff, g)[0, 0, 1, 1].item() == pytest.approx(half + 10, rel=1e-4)
    # Source outside, detector inside at y = 15: from -40 to 15.
    g = XRayGeometry.from_carm([0, -500, 0], [0, 15, 0], [0, 0, -1], [-1, 0, 0], 1.0, 3, 3)
    assert line_integrals(vol, aff, g)[0, 0, 1, 1].item() == pytest.approx(half + 15, rel=1e-4)
    # Both inside: only the 7.3 mm between them.
    g = XRayGeometry.from_carm([0, 2.2, 0], [0, 9.5, 0], [0, 0, -1], [-1, 0, 0], 1.0, 3, 3)
    assert line_integrals(vol, aff, g)[0, 0, 1, 1].item() == pytest.approx(7.3, rel=1e-3)


def test_rays_that_miss_the_volume_read_zero_and_the_unattenuated_value():
    g = ap_geometry(pixels=41, detector_mm=400)  # 200 mm at the isocentre, the box is 80 mm
    hits = ray_box_hits(g, [-40] * 3, [40] * 3)[0]
    out = line_integrals(torch.ones(1, N, N, N), grid_affine(), g)[0, 0].numpy()
    assert (out[~hits] == 0).all() and (out[hits] > 0).any()
    image = XRaySensor(np.zeros((N, N, N), np.float32), grid_affine()).render(g, kvp=70)
    assert np.allclose(image.transmission[0, 0].numpy()[~hits], 1.0, rtol=0, atol=1e-6)
    assert (image.image[0, 0].numpy()[~hits] == 0).all()


def test_a_view_whose_rays_all_miss_the_volume_reads_zero():
    g = XRayGeometry.from_isocentre([0, 0, 900], [0.3, 1, 0.2], pixels=16, detector_mm=100)
    out = line_integrals(torch.ones(1, N, N, N), grid_affine(), g)
    assert out.shape == (1, 1, 16, 16) and (out == 0).all()
    batch = XRayGeometry.cat([g, ap_geometry(pixels=16)])  # one item misses, one hits
    both = line_integrals(torch.ones(1, N, N, N), grid_affine(), batch)
    assert (both[0] == 0).all() and (both[1] > 0).any()


def test_ras_and_las_storage_of_one_ct_give_the_same_image():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 300, (N, N - 4, N + 3)).astype(np.float32)
    hu[:8] += 800  # asymmetric left-right
    aff = grid_affine()
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, hu.shape[0] - 1  # i -> I - 1 - i
    g = XRayGeometry.cat(
        [
            XRayGeometry.from_isocentre([3, -2, 5], beam, pixels=31, detector_mm=180)
            for beam in ([0.2, 1, 0.1], [-1, 0.3, 0])
        ]
    )
    ras = XRaySensor(hu, aff).render(g, kvp=90).attenuation
    las = XRaySensor(hu[::-1].copy(), aff @ flip).render(g, kvp=90).attenuation
    assert torch.allclose(ras, las, rtol=1e-4, atol=1e-5)


def test_projector_rejects_bad_volumes_and_affines():
    g = ap_geometry()
    with pytest.raises(ValueError, match="volume must be"):
        line_integrals(torch.ones(N, N, N), grid_affine(), g)
    with pytest.raises(ValueError, match="singular"):
        line_integrals(torch.ones(1, N, N, N), np.diag([1.0, 0.0, 1.0, 1.0]), g)
    with pytest.raises(ValueError, match="affine must be"):
        line_integrals(torch.ones(1, N, N, N), np.eye(3), g)
    with pytest.raises(ValueError, match="last row"):
        line_integrals(torch.ones(1, N, N, N), np.ones((4, 4)), g)
    with pytest.raises(ValueError, match="finite"):
        line_integrals(torch.ones(1, N, N, N), np.full((4, 4), np.nan), g)
    with pytest.raises(ValueError, match="volume_index"):
        line_integrals(torch.ones(3, 1, N, N, N), grid_affine(), XRayGeometry.cat([g, g]))
    with pytest.raises(ValueError, match="volume_index"):
        VolumeProjector(torch.ones(2, 1, N, N, N), grid_affine()).line_integrals(g, [5])
    with pytest.raises(TypeError, match="XRayGeometry"):
        line_integrals(torch.ones(1, N, N, N), grid_affine(), "AP")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source_mm": [0, 0, float("nan")]}, "finite"),
        ({"pixel_mm": [1.0, 0.0]}, "pixel_mm must be > 0"),
        ({"pixel_mm": [-1.0, 1.0]}, "pixel_mm must be > 0"),
        ({"row_dir": [1, 0, 0]}, "orthogonal"),
        ({"col_dir": [0, 0, 0]}, "non-zero"),
        ({"rows": 0}, "rows must be a positive int"),
        ({"cols": 2.5}, "cols must be a positive int"),
        (
            {"source_mm": [[0, -500, 0], [0, -400, 0]], "detector_centre_mm": [[0, 0, 0]] * 3},
            "batch size",
        ),
        ({"source_mm": [0, -500]}, "source_mm must have shape"),
        ({"source_mm": [1, 500, 0]}, "detector plane"),
        ({"field_mm": [0, 10]}, "field_mm must be > 0"),
    ],
)
def test_geometry_rejects_bad_values(kwargs, match):
    args = {
        "source_mm": [0, -500, 0],
        "detector_centre_mm": [0, 500, 0],
        "row_dir": [0, 0, -1],
        "col_dir": [-1, 0, 0],
        "pixel_mm": [1.0, 1.0],
        "rows": 4,
        "cols": 4,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        XRayGeometry(**args)


# ----- physics ------------------------------------------------------------------------------


@pytest.mark.parametrize("energy_kev", [30.0, 60.0, 100.0])
def test_monoenergetic_cube_gives_exp_minus_mu_l(energy_kev):
    side = 26  # voxels: 52 mm of soft tissue (HU 0), nothing else (padding has density 0)
    sensor = XRaySensor(soft_cube(side), grid_affine())
    image = sensor.render(ap_geometry(pixels=33, detector_mm=20), monoenergetic_kev=energy_kev)
    mu_cm = xray_physics.mass_attenuation(energy_kev)[0, 1] * tissues.density_from_hu(0.0)
    expected = np.exp(-mu_cm * side * SPACING_MM / 10.0)
    assert image.transmission[0, 0, 16, 16].item() == pytest.approx(expected, rel=0.01)
    assert image.material_path_g_cm2[0, 0, 16, 16].item() == 0.0  # air channel empty


def test_polychromatic_beam_hardens_and_lies_between_the_extreme_energies():
    sensor = XRaySensor(soft_cube(30), grid_affine())
    g = ap_geometry(pixels=33, detector_mm=20)
    thin = XRaySensor(soft_cube(6), grid_affine()).render(g, kvp=80).attenuation[0, 0, 16, 16]
    thick = sensor.render(g, kvp=80).attenuation[0, 0, 16, 16]
    assert thick / 30 < thin / 6  # effective mu falls with thickness (beam hardening)
    mono_lo = sensor.render(g, kvp=80, monoenergetic_kev=30).attenuation[0, 0, 16, 16]
    mono_hi = sensor.render(g, kvp=80, monoenergetic_kev=80).attenuation[0, 0, 16, 16]
    assert mono_hi < thick < mono_lo


def test_all_air_volume_gives_a_flat_image_and_a_water_cube_a_finite_one():
    air = XRaySensor(np.full((N, N, N), -1000.0, np.float32), grid_affine())
    image = air.render(ap_geometry(pixels=33), kvp=70, noise_seeds=[3])
    assert int(image.image.min()) == int(image.image.max()) == 0
    assert torch.isfinite(image.attenuation).all()
    water = XRaySensor(soft_cube(20, hu=0.0, background=-1000.0), grid_affine())
    image = water.render(ap_geometry(pixels=33), kvp=70, noise_seeds=[3])
    for t in (image.attenuation, image.transmission, image.detector_kerma_ugy):
        assert torch.isfinite(t).all()
    assert image.image[0, 0, 16, 16] > image.image[0, 0, 0, 0]


def test_one_bright_voxel_changes_only_the_pixels_whose_rays_cross_it():
    rng = np.random.default_rng(1)
    hu = rng.normal(20, 40, (N, N, N)).astype(np.float32)
    aff = grid_affine()
    g = XRayGeometry.from_isocentre([0, 0, 0], [0.3, 1, 0.2], pixels=48, detector_mm=250)
    before = XRaySensor(hu, aff).render(g, kvp=80).image
    i, j, k = 25, 14, 20
    hu[i, j, k] = 8000.0
    after = XRaySensor(hu, aff).render(g, kvp=80).image
    changed = (before != after)[0, 0].numpy()
    # Trilinear support of the voxel: one voxel around its centre on each axis.
    centre = aff[:3, :3] @ np.array([i, j, k]) + aff[:3, 3]
    support = ray_box_hits(g, centre - SPACING_MM, centre + SPACING_MM)[0]
    assert changed.any() and not (changed & ~support).any()


def test_fully_attenuated_and_collimated_pixels_stay_finite_with_noise():
    hu = np.full((N, N, N), 8000.0, dtype=np.float32)  # 80 mm of metal-dense bone
    g = ap_geometry(pixels=33, field_mm=(60, 80))
    image = XRaySensor(hu, grid_affine()).render(g, kvp=60, mas=0.01, noise_seeds=[11])
    for t in (image.attenuation, image.transmission, image.detector_kerma_ugy):
        assert torch.isfinite(t).all()
    assert (image.transmission[image.exposed] == 0).any()  # no photon through the bone
    outside = ~image.exposed
    assert outside.any() and (image.image[outside] == 255).all()  # unexposed is white
    assert (image.detector_kerma_ugy[outside] == 0).all()


def test_noise_matches_the_compound_poisson_moments():
    sensor = XRaySensor(soft_cube(30), grid_affine())
    g = ap_geometry(pixels=32, detector_mm=10)  # all rays cross the same 60 mm of tissue
    clean = sensor.render(g, kvp=70, mas=0.01).transmission
    noisy = sensor.render(g, kvp=70, mas=0.01, noise_seeds=[5]).transmission
    assert noisy.mean().item() == pytest.approx(clean.mean().item(), rel=0.02)
    assert noisy.std().item() > 0
    # Relative noise falls as 1/sqrt(mAs).
    noisy_4x = sensor.render(g, kvp=70, mas=0.04, noise_seeds=[5]).transmission
    ratio = (noisy.std() / noisy.mean()) / (noisy_4x.std() / noisy_4x.mean())
    assert ratio.item() == pytest.approx(2.0, rel=0.15)


def test_spectrum_and_tube_output_are_plausible():
    photons, energy, _ = xray_physics.spectrum([60, 80, 120])
    assert np.allclose(photons.sum(-1), 1)
    mean_kev = (photons * energy).sum(-1)
    assert (mean_kev > 0.3 * np.array([60, 80, 120])).all()
    assert (mean_kev < 0.65 * np.array([60, 80, 120])).all()
    assert photons[0][energy[0] > 60].sum() == 0
    # FACTS.md: about 30-100 uGy/mAs at 1 m for 60-120 kVp.
    output = dose.tube_output_ugy_per_mas([60, 120])
    assert 20 < output[0] < 40 and 80 < output[1] < 130
    # Measured beams: HVL about 3 mm Al at 80 kVp (21 CFR 1020.30 minimum 2.9 mm).
    assert 2.5 < dose.half_value_layer_mm_al(80) < 3.5
    assert dose.tube_output_ugy_per_mas(80, 6.0) < dose.tube_output_ugy_per_mas(80, 2.5)


def test_attenuation_table_matches_facts_and_interpolates_log_log():
    mu = xray_physics.mass_attenuation([30, 60, 100])
    facts = np.array([[0.354, 0.379, 1.331], [0.188, 0.205, 0.315], [0.154, 0.169, 0.186]])
    assert np.allclose(mu, facts, rtol=0.01)
    between = xray_physics.mass_attenuation(45)[0]
    assert (
        (between < xray_physics.mass_attenuation(40)[0])
        & (between > xray_physics.mass_attenuation(50)[0])
    ).all()


def test_material_densities_reuse_the_tissue_table():
    hu = np.array([[[-1000.0, -850.0, 0.0, 1000.0, -2048.0]]])
    rho = material_densities(hu)  # (3, 1, 1, 5)
    assert rho.shape == (3, 1, 1, 5)
    assert np.allclose(rho.sum(0), tissues.density_from_hu(hu))
    assert (rho[:, 0, 0].argmax(0)[:4] == tissues.xray_material_from_hu(hu)[0, 0, :4]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kvp": 30}, "kVp must lie in"),
        ({"kvp": 160}, "kVp must lie in"),
        ({"mas": -1.0}, "mAs must be"),
        ({"mas": [1.0, 2.0]}, "mas must be a scalar"),
        ({"noise_seeds": [1, 2]}, "one noise seed per batch item"),
        ({"monoenergetic_kev": 5.0}, "monoenergetic_kev must lie"),
        ({"filtration_mm_al": -1.0}, "filtration_mm_al must be >= 0"),
        ({"window": (5.0, 1.0)}, "window"),
    ],
)
def test_render_rejects_bad_exposure_values(kwargs, match):
    sensor = XRaySensor(soft_cube(10), grid_affine())
    with pytest.raises(ValueError, match=match):
        sensor.render(ap_geometry(pixels=8), **kwargs)


def test_sensor_rejects_bad_construction():
    with pytest.raises(ValueError, match="hu must be"):
        XRaySensor(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="max_voxel_mm"):
        XRaySensor(np.zeros((4, 4, 4)), np.eye(4), max_voxel_mm=0.0)
    with pytest.raises(ValueError, match="slab_mm"):
        XRaySensor(np.zeros((4, 4, 4)), np.eye(4), slab_mm=-1.0)
    assert XRaySensor(
        np.zeros((8, 8, 8)), np.diag([0.7, 0.7, 2.5, 1]), slab_mm=3.0
    ).slab_voxels == (
        4,
        4,
        1,
    )
    with pytest.raises(ValueError, match="singular"):
        XRaySensor(np.zeros((4, 4, 4)), np.zeros((4, 4)) + np.diag([0, 0, 0, 1.0]))
    with pytest.raises(ValueError, match="no label volume"):
        XRaySensor(np.zeros((4, 4, 4)), np.eye(4)).project_labels(ap_geometry(), ["liver"])


# ----- batching ------------------------------------------------------------------------------


def test_a_batch_equals_its_items_rendered_one_by_one():
    rng = np.random.default_rng(2)
    hu = np.stack([rng.normal(100 * p, 300, (N, N, N)) for p in range(2)]).astype(np.float32)
    sensor = XRaySensor(hu, grid_affine())
    g = XRayGeometry.cat(
        [
            XRayGeometry.from_isocentre([0, 0, 0], [0, 1, 0], pixels=24, detector_mm=200),
            XRayGeometry.from_isocentre([5, 0, 0], [1, 0.2, 0], pixels=24, detector_mm=200),
            XRayGeometry.from_isocentre(
                [0, 4, 0], [1, 1, 1], pixels=24, detector_mm=200, field_mm=(90, 120)
            ),
        ]
    )
    kvp, mas, seeds, index = [70, 90, 120], [1.0, 2.0, 0.5], [7, 8, 9], [1, 0, 1]
    batch = sensor.render(g, kvp=kvp, mas=mas, noise_seeds=seeds, volume_index=index)
    for b in range(3):
        one = sensor.render(
            g[b], kvp=kvp[b], mas=mas[b], noise_seeds=[seeds[b]], volume_index=[index[b]]
        )
        for name in ("attenuation", "detector_kerma_ugy", "material_path_g_cm2", "dap_mgy_cm2"):
            assert torch.allclose(
                getattr(batch, name)[b], getattr(one, name)[0], rtol=1e-5, atol=1e-6
            ), name
        assert torch.equal(batch.image[b], one.image[0])


def test_downsampled_volume_keeps_line_integrals_close():
    rng = np.random.default_rng(4)
    hu = np.clip(rng.normal(0, 200, (N, N, N)), -1000, 1500).astype(np.float32)
    g = ap_geometry(pixels=16, detector_mm=100)
    full = XRaySensor(hu, grid_affine()).material_paths(g).sum(1)
    coarse = XRaySensor(hu, grid_affine(), max_voxel_mm=4.0)
    assert coarse.factors == (2, 2, 2)
    assert torch.allclose(coarse.material_paths(g).sum(1), full, rtol=0.05)


# ----- dose and labels -----------------------------------------------------------------------


def test_dap_is_invariant_along_the_beam_and_linear_in_mas():
    near = dose.dose_area_product_mgy_cm2(80, 2.0, 100.0, 500.0)
    far = dose.dose_area_product_mgy_cm2(80, 2.0, 400.0, 1000.0)
    assert near == pytest.approx(far)
    assert dose.dose_area_product_mgy_cm2(80, 4.0, 100.0, 500.0) == pytest.approx(2 * near)
    # The same collimated cone with the detector moved: same DAP.
    short = XRayGeometry.from_isocentre(
        [0, 0, 0], [0, 1, 0], source_to_detector_mm=900, field_mm=(90, 90)
    )
    long = XRayGeometry.from_isocentre(
        [0, 0, 0], [0, 1, 0], source_to_detector_mm=1200, field_mm=(120, 120)
    )
    a, b = (dose.exposure_dap_mgy_cm2(g, 80, 2.0) for g in (short, long))
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    # Analytic: 50 uGy/mAs at 1 m and 80 kVp, 2 mAs, 9 x 9 cm at 0.9 m.
    assert a.item() == pytest.approx(50 * 2 * (1000 / 900) ** 2 * 81 / 1000, rel=1e-4)
    with pytest.raises(ValueError, match="distance_mm"):
        dose.air_kerma_ugy(80, 1.0, 0.0)
    with pytest.raises(ValueError, match="field_area_cm2"):
        dose.dose_area_product_mgy_cm2(80, 1.0, -1.0, 100.0)


def test_label_projection_gives_each_structure_its_path_length():
    labels = np.zeros((N, N, N), dtype=np.int16)
    labels[10:20, 10:30, 12:28] = 1  # x: 10 voxels = 20 mm ... y: 20 voxels = 40 mm
    labels[25:35, 5:15, 5:15] = 2
    sensor = XRaySensor(
        np.zeros((N, N, N), np.float32),
        grid_affine(),
        labels=labels,
        label_names={1: "liver", 2: "spleen"},
    )
    g = ap_geometry(pixels=41, detector_mm=200)
    out = sensor.project_labels(g, ["liver", "spleen", [1, 2]])
    assert out.shape == (1, 3, 41, 41)
    aff = grid_affine()
    centre = aff[:3, :3] @ np.array([14.5, 19.5, 19.5]) + aff[:3, 3]
    u, v = g.project(torch.tensor(centre)[None])[0, 0].round().long().tolist()
    assert out[0, 0, v, u].item() == pytest.approx(40.0, rel=0.02)
    lo = aff[:3, :3] @ np.array([10, 10, 12]) + aff[:3, 3] - SPACING_MM / 2
    hi = aff[:3, :3] @ np.array([19, 29, 27]) + aff[:3, 3] + SPACING_MM / 2
    grown = ray_box_hits(g, lo - SPACING_MM, hi + SPACING_MM)[0]
    assert not ((out[0, 0].numpy() > 0) & ~grown).any()
    assert torch.allclose(out[0, 2], out[0, 0] + out[0, 1], atol=1e-4)
    with pytest.raises(KeyError, match="no structure"):
        sensor.project_labels(g, ["heart"])


# ----- devices and the example CT -------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_render_matches_cpu():
    hu = np.random.default_rng(5).normal(0, 300, (N, N, N)).astype(np.float32)
    g = XRayGeometry.cat(
        [
            ap_geometry(pixels=32),
            XRayGeometry.from_isocentre([0, 0, 0], [1, 0.5, 0], pixels=32, detector_mm=150),
        ]
    )
    cpu = XRaySensor(hu, grid_affine()).render(g, kvp=[70, 100])
    gpu = XRaySensor(hu, grid_affine(), device="cuda").render(g.to("cuda"), kvp=[70, 100])
    assert gpu.image.device.type == "cuda"
    assert torch.allclose(gpu.attenuation.cpu(), cpu.attenuation, rtol=1e-4, atol=1e-4)


@pytest.mark.chest_ct
@pytest.mark.slow
def test_example_chest_ct_ap_drr_looks_like_a_chest_radiograph(chest_ct_path, tmp_path):
    from sonoray.assets.ct import load_example_ct

    patient = load_example_ct(chest_ct_path, spacing_mm=(1.4, 1.4, 2.5))
    sensor = XRaySensor.from_patients(patient)
    centre = patient.voxel_to_patient((np.array(patient.shape) - 1) / 2)
    g = XRayGeometry.from_isocentre(
        centre, [0, 1, 0], source_to_isocentre_mm=850, detector_mm=400, pixels=192
    )
    image = sensor.render(g, kvp=110, mas=2.0)
    img = image.image[0, 0].float()
    lungs, spine = sensor.project_labels(g, ["lungs", "vertebrae"])[0]
    lung_only = (lungs > 50) & (spine == 0)
    spine_col = spine > 10
    assert img[lung_only].mean() + 40 < img[spine_col].mean()  # lungs dark, spine bright
    # Heart on the patient's left = the viewer's right.
    heart = sensor.project_labels(g, ["heart"])[0, 0]
    cols = torch.arange(g.cols).float()
    heart_col = (heart.sum(0) * cols).sum() / heart.sum()
    assert heart_col > (g.cols - 1) / 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.imsave(tmp_path / "chest_ap_drr.png", img.numpy(), cmap="gray", vmin=0, vmax=255)

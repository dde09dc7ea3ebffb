"""Tests of the procedural phantom and of the three-slice figure.

Anatomy is checked against published adult ranges and relations, CT numbers against the
tissue table, noise against its parameter, and determinism across processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from sonoray.assets import tissues
from sonoray.assets.patient import Patient
from sonoray.assets.phantom import (
    PHANTOM_LABELS,
    PHANTOM_SHAPE,
    PHANTOM_SPACING_MM,
    PhantomParams,
    make_phantom,
    phantom_affine,
    sample_phantom_params,
)
from sonoray.assets.slices import canonical_arrays, save_mid_slices

SEEDS = (0, 1, 2)
VERTEBRAE = [f"vertebrae_T{i}" for i in range(1, 13)] + [f"vertebrae_L{i}" for i in range(1, 6)]
REQUIRED = [
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "heart",
    "aorta",
    "liver",
    "spleen",
    "kidney_left",
    "kidney_right",
    "stomach",
    "autochthon_left",
    "autochthon_right",
    *VERTEBRAE,
    "sacrum",
    *[f"rib_{side}_{k}" for side in ("left", "right") for k in range(1, 13)],
    "sternum",
    "hip_left",
    "hip_right",
]


@pytest.fixture(scope="module")
def phantoms() -> dict[int, Patient]:
    return {seed: make_phantom(seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def centroids(phantoms) -> dict[int, dict[str, np.ndarray]]:
    """Centroid (patient mm) of every structure of every phantom, in one pass per phantom."""
    out = {}
    for seed, p in phantoms.items():
        ids = sorted(p.label_names)
        ijk = ndimage.center_of_mass(np.ones(p.shape, np.uint8), p.labels, ids)
        out[seed] = {p.label_names[i]: p.voxel_to_patient(c) for i, c in zip(ids, ijk, strict=True)}
    return out


def _digest(patient: Patient) -> str:
    h = hashlib.sha256(patient.hu.tobytes())
    h.update(patient.labels.tobytes())
    return h.hexdigest()


# ----- determinism ---------------------------------------------------------------------------


def test_same_seed_gives_the_same_phantom_in_another_process(phantoms):
    code = (
        "import hashlib; from sonoray.assets.phantom import make_phantom; p = make_phantom(1); "
        "h = hashlib.sha256(p.hu.tobytes()); h.update(p.labels.tobytes()); print(h.hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4321"}  # a different str hash() in the child
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == _digest(phantoms[1])


def test_different_seeds_give_different_patients(phantoms):
    assert phantoms[0].meta["params"] != phantoms[1].meta["params"]
    assert _digest(phantoms[0]) != _digest(phantoms[1])
    assert not np.array_equal(phantoms[0].labels, phantoms[1].labels)


def test_meta_holds_seed_and_params_that_rebuild_the_draw(phantoms):
    for seed, p in phantoms.items():
        assert p.meta["seed"] == seed
        assert p.name == f"phantom-{seed:04d}"
        assert PhantomParams(**p.meta["params"]) == sample_phantom_params(seed)


def test_noise_only_override_keeps_the_anatomy(phantoms):
    quiet = make_phantom(0, hu_noise_std_hu=0.0)
    assert quiet.meta["params"]["hu_noise_std_hu"] == 0.0
    np.testing.assert_array_equal(quiet.labels, phantoms[0].labels)
    np.testing.assert_array_equal(quiet.body_mask, phantoms[0].body_mask)
    # Without noise every liver voxel holds the liver's tabulated CT number exactly.
    liver = quiet.mask("liver")
    assert np.all(quiet.hu[liver] == np.float32(tissues.tissue("liver").hu_mean))
    # With noise, the liver's spread is the noise parameter (liver HU is uniform otherwise).
    sigma = phantoms[0].meta["params"]["hu_noise_std_hu"]
    assert np.std(phantoms[0].hu[liver]) == pytest.approx(sigma, rel=0.03)
    assert np.mean(phantoms[0].hu[liver]) == pytest.approx(tissues.tissue("liver").hu_mean, abs=0.5)


# ----- grid and body -------------------------------------------------------------------------


def test_grid_shape_spacing_and_affine(phantoms):
    affine = phantom_affine()
    np.testing.assert_allclose(np.diag(affine)[:3], [PHANTOM_SPACING_MM] * 3)
    centre = affine @ np.append((np.array(PHANTOM_SHAPE) - 1) / 2.0, 1.0)
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    for p in phantoms.values():
        assert p.shape == PHANTOM_SHAPE
        np.testing.assert_array_equal(p.affine, affine)
        assert p.hu.dtype == np.float32 and p.labels.dtype == np.int16


def test_body_mask_is_the_patient_and_outside_is_air(phantoms):
    for p in phantoms.values():
        body = p.body_mask
        assert np.all(p.hu[~body] == -1000.0)
        assert np.all(body[p.labels > 0])  # every structure, lungs included, is inside
        assert np.array_equal(ndimage.binary_fill_holes(body), body)
        _, n_parts = ndimage.label(body)
        assert n_parts == 1


def test_largest_allowed_body_fits_the_grid_with_margin():
    ranges = PhantomParams.ranges()
    largest = {
        k: ranges[k][1]
        for k in ("torso_height_mm", "trunk_width_mm", "trunk_depth_mm", "fat_thickness_mm")
    }
    p = make_phantom(7, **largest, hu_noise_std_hu=0.0)
    idx = np.argwhere(p.body_mask)
    margin = np.minimum(idx.min(axis=0), np.array(PHANTOM_SHAPE) - 1 - idx.max(axis=0))
    assert margin.min() >= 3, margin


def test_body_size_follows_params(phantoms):
    for p in phantoms.values():
        params = p.meta["params"]
        size = p.body_bounds_mm[1] - p.body_bounds_mm[0]
        fat = params["fat_thickness_mm"]
        # Width: the lean chest plus fat on both sides, up to 4 % wider at hips and shoulders.
        assert (
            params["trunk_width_mm"] + 2 * fat - 4
            <= size[0]
            <= 1.05 * params["trunk_width_mm"] + 2 * fat + 4
        )
        # Height: the torso plus the neck stub above T1.
        assert size[2] == pytest.approx(params["torso_height_mm"] + 45.0, abs=6.0)


# ----- structures ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_every_required_structure_is_present(phantoms, seed):
    missing = sorted(set(REQUIRED) - set(phantoms[seed].structures))
    assert not missing
    assert set(phantoms[seed].label_names.values()) <= set(PHANTOM_LABELS.values())


def test_label_ids_are_totalsegmentator_ids():
    expected = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach",
                10: "lung_upper_lobe_left", 14: "lung_lower_lobe_right", 25: "sacrum",
                27: "vertebrae_L5", 43: "vertebrae_T1", 51: "heart", 52: "aorta",
                77: "hip_left", 86: "autochthon_left", 92: "rib_left_1", 115: "rib_right_12",
                116: "sternum"}  # fmt: skip
    for i, name in expected.items():
        assert PHANTOM_LABELS[i] == name


def test_group_names_resolve(phantoms):
    p = phantoms[0]
    counts = {"lungs": 5, "lung_left": 2, "lung_right": 3, "ribs": 24, "ribs_left": 12,
              "spine": 18, "vertebrae": 17, "kidneys": 2, "hips": 2, "pelvis": 3}  # fmt: skip
    for group, n in counts.items():
        assert len(p.structure_ids(group)) == n, group


@pytest.mark.parametrize("seed", SEEDS)
def test_organ_volumes_are_adult_and_match_their_targets(phantoms, seed):
    p = phantoms[seed]
    params = p.meta["params"]
    plausible = {"liver": (1000, 2500), "kidney_left": (100, 250), "kidney_right": (100, 250),
                 "spleen": (90, 320), "heart": (475, 945), "stomach": (140, 630)}  # fmt: skip
    for organ, (low, high) in plausible.items():
        volume = p.volume_ml(organ)
        assert low <= volume <= high, (organ, volume)
        assert volume == pytest.approx(params[f"{organ}_volume_ml"], rel=0.05), organ
    assert 2500 <= p.volume_ml("lungs") <= 7000
    for lobe in p.structure_ids("lungs"):
        share = p.volume_ml(p.label_names[lobe]) / p.volume_ml("lungs")
        assert 0.05 <= share <= 0.35, (p.label_names[lobe], share)


def _hu_range(structure: str) -> tuple[float, float]:
    name = tissues.tissue_of_structure(structure)
    low, high = tissues.tissue(name).hu_range
    if name == "cortical_bone":  # bones are a cortical shell over a cancellous core
        low = tissues.tissue("cancellous_bone").hu_range[0]
    return low, high


@pytest.mark.parametrize("seed", SEEDS)
def test_median_hu_of_every_label_lies_in_its_tissue_range(phantoms, seed):
    p = phantoms[seed]
    ids = sorted(p.label_names)
    medians = ndimage.median(p.hu, p.labels, ids)
    for i, median in zip(ids, medians, strict=True):
        low, high = _hu_range(p.label_names[i])
        assert low <= median <= high, (p.label_names[i], median, (low, high))


def test_bones_have_a_cortical_shell_and_a_cancellous_core():
    p = make_phantom(0, hu_noise_std_hu=0.0)
    cortical, cancellous = (tissues.tissue(n).hu_mean for n in ("cortical_bone", "cancellous_bone"))
    bones = p.mask("bones")
    for name in ("vertebrae_L3", "vertebrae_T8", "sacrum", "hip_left", "sternum", "rib_left_6"):
        hu = p.hu[p.mask(name)]
        assert np.mean(hu == cortical) > 0.15, name
        assert np.mean(hu == cancellous) > 0.05, name
        # The shell encloses the core: no core voxel touches anything but bone (the sacrum's
        # core may meet the hip bones at the sacroiliac joints).
        core = p.mask(name) & (p.hu == cancellous)
        assert not np.any(core & ~ndimage.binary_erosion(bones)), name


def test_unlabelled_tissues_have_realistic_hu(phantoms):
    p = phantoms[0]
    for name, where in (("skin", p.skin_shell), ("fat", p.tissue_map == tissues.TISSUE_IDS["fat"])):
        low, high = tissues.tissue(name).hu_range
        assert low <= float(np.median(p.hu[where])) <= high, name
    unlabelled = p.body_mask & (p.labels == 0)
    fat_share = np.mean(p.tissue_map[unlabelled] == tissues.TISSUE_IDS["fat"])
    soft_share = np.mean(p.tissue_map[unlabelled] == tissues.TISSUE_IDS["soft_tissue"])
    assert 0.15 < fat_share < 0.8 and 0.15 < soft_share < 0.8


# ----- anatomy -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_anatomical_relations(centroids, seed):
    c = centroids[seed]
    x, y, z = 0, 1, 2
    assert c["liver"][x] > 0 > c["spleen"][x]  # liver right (RAS +x), spleen left
    assert c["spleen"][y] < c["stomach"][y]  # spleen posterior to the stomach
    assert c["stomach"][x] < 0
    assert c["heart"][z] > c["liver"][z] and c["heart"][x] < 0
    assert c["lung_upper_lobe_left"][z] > c["lung_lower_lobe_left"][z]
    assert c["lung_upper_lobe_right"][z] > c["lung_middle_lobe_right"][z]
    assert c["lung_middle_lobe_right"][y] > c["lung_lower_lobe_right"][y]  # middle lobe in front
    assert c["sternum"][y] > c["heart"][y] > c["vertebrae_T8"][y]
    assert c["autochthon_left"][y] < c["vertebrae_L1"][y]

    # Kidneys beside L1-L3, the right one lower than the left.
    spine_x = c["vertebrae_L2"][x]
    for side, sign in (("kidney_left", -1), ("kidney_right", 1)):
        assert c["vertebrae_L3"][z] - 20 < c[side][z] < c["vertebrae_T12"][z], side
        assert 30 < sign * (c[side][x] - spine_x) < 130, side
    assert c["kidney_right"][z] < c["kidney_left"][z]

    # The column runs T1 at the top to the sacrum at the bottom, ribs descend in order.
    levels = [c[v][z] for v in VERTEBRAE] + [c["sacrum"][z]]
    assert all(a > b for a, b in zip(levels, levels[1:], strict=False))
    for side, sign in (("left", -1), ("right", 1)):
        ribs = [c[f"rib_{side}_{k}"] for k in range(1, 13)]
        assert all(sign * r[x] > 0 for r in ribs)
        assert all(a[z] > b[z] for a, b in zip(ribs[:10], ribs[1:10], strict=False))
        assert sign * c[f"hip_{side}"][x] > 0


def test_ribs_slope_down_towards_the_front(phantoms):
    p = phantoms[0]
    for k in (3, 5, 7, 9):
        idx = np.argwhere(p.mask(f"rib_right_{k}"))
        xyz = p.voxel_to_patient(idx)
        back, front = (
            xyz[xyz[:, 1] < np.quantile(xyz[:, 1], 0.1)],
            xyz[xyz[:, 1] > np.quantile(xyz[:, 1], 0.9)],
        )
        assert back[:, 2].mean() - front[:, 2].mean() > 40.0, k


def test_stomach_gas_floats_anteriorly(phantoms):
    p = phantoms[0]
    stomach = p.mask("stomach")
    gas = stomach & (p.hu < -500)
    fraction = p.meta["params"]["stomach_gas_fraction"]
    assert gas.sum() / stomach.sum() == pytest.approx(fraction, abs=0.12)
    y_gas = p.voxel_to_patient(np.argwhere(gas))[:, 1]
    y_fluid = p.voxel_to_patient(np.argwhere(stomach & (p.hu > -500)))[:, 1]
    assert y_gas.min() >= np.median(y_fluid)


# ----- parameters ----------------------------------------------------------------------------


def test_sampled_params_are_deterministic_and_in_range():
    ranges = PhantomParams.ranges()
    draws = [sample_phantom_params(seed) for seed in range(40)]
    assert draws[3] == sample_phantom_params(3)
    for params in draws:
        for name, (low, high) in ranges.items():
            assert low <= getattr(params, name) <= high
    heights = [d.torso_height_mm for d in draws]
    assert np.std(heights) > 10.0


def test_params_cover_documented_fields():
    names = {f.name for f in dataclasses.fields(PhantomParams)}
    assert names == set(PhantomParams.ranges())
    assert all(n.endswith(("_mm", "_ml", "_hu", "_fraction")) for n in names)


@pytest.mark.parametrize("name", sorted(PhantomParams.ranges()))
def test_out_of_range_param_raises_with_value_and_range(name):
    low, high = PhantomParams.ranges()[name]
    for bad in (high + 0.5 * (high - low) + 1.0, low - 0.5 * (high - low) - 1.0):
        with pytest.raises(ValueError, match=rf"{name}=.*\[{low}, {high}\]"):
            PhantomParams(**{name: bad})


@pytest.mark.parametrize("bad", ["big", math.nan, None, True])
def test_non_numeric_param_raises(bad):
    with pytest.raises(ValueError, match="liver_volume_ml"):
        PhantomParams(liver_volume_ml=bad)


def test_out_of_range_override_raises_before_building():
    with pytest.raises(ValueError, match=r"trunk_width_mm=500.*\[250.0, 330.0\]"):
        make_phantom(0, trunk_width_mm=500)


def test_unknown_override_raises_and_lists_the_allowed():
    with pytest.raises(ValueError, match=r"unknown phantom parameter.*liver_volume.*allowed"):
        make_phantom(0, liver_volume=1500.0)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "3", None])
def test_bad_seed_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        make_phantom(seed)
    with pytest.raises(ValueError, match="seed"):
        sample_phantom_params(seed)


def test_params_must_be_phantom_params():
    with pytest.raises(ValueError, match="PhantomParams"):
        make_phantom(0, params={"liver_volume_ml": 1500.0})


# ----- slices figure -------------------------------------------------------------------------


def test_canonical_arrays_undo_any_axis_order_and_flip(phantoms):
    p = phantoms[2]
    hu0, lab0, spacing0, origin0 = canonical_arrays(p)
    # The same patient stored as (z, x, y) with x and z flipped, as a scanner might.
    hu = np.transpose(p.hu, (2, 0, 1))[::-1, ::-1, :]
    labels = np.transpose(p.labels, (2, 0, 1))[::-1, ::-1, :]
    n = p.shape
    affine = np.zeros((4, 4))
    affine[2, 0] = -PHANTOM_SPACING_MM  # i runs towards -z
    affine[0, 1] = -PHANTOM_SPACING_MM  # j runs towards -x
    affine[1, 2] = PHANTOM_SPACING_MM  # k runs towards +y
    affine[:3, 3] = p.voxel_to_patient([n[0] - 1, 0, n[2] - 1])
    affine[3, 3] = 1.0
    moved = Patient("moved", hu, labels, p.label_names, affine, np.ones(hu.shape, bool))
    hu1, lab1, spacing1, origin1 = canonical_arrays(moved)
    np.testing.assert_array_equal(hu1, hu0)
    np.testing.assert_array_equal(lab1, lab0)
    np.testing.assert_allclose(spacing1, spacing0)
    np.testing.assert_allclose(origin1, origin0)


def test_save_mid_slices_writes_a_png(phantoms, tmp_path):
    import matplotlib.image

    path = save_mid_slices(phantoms[0], tmp_path / "slices.png")
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (1000, 1500)
    assert image[..., :3].std() > 0.05  # not blank

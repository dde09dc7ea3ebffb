"""Tissue table and Patient twin: published values, HU classification, structure groups."""

from __future__ import annotations

import numpy as np
import pytest

from sonoray.assets import tissues
from sonoray.assets.patient import Patient


def _reflection(a: str, b: str) -> float:
    z1, z2 = tissues.tissue(a).impedance_mrayl, tissues.tissue(b).impedance_mrayl
    return ((z2 - z1) / (z2 + z1)) ** 2


def test_density_fit_matches_published_points():
    rho = tissues.density_from_hu(np.array([-1000.0, 0.0, 1000.0, -3000.0]))
    np.testing.assert_allclose(rho[:3], [0.001, 1.03, 1.6186], atol=2e-3)
    assert rho[3] == 0.0


def test_xray_material_thresholds():
    mats = tissues.xray_material_from_hu(np.array([-1000, -800, -799, 350, 351]))
    assert [tissues.XRAY_MATERIALS[m] for m in mats] == [
        "air",
        "air",
        "soft_tissue",
        "soft_tissue",
        "bone",
    ]


def test_intensity_reflections_match_published_values():
    assert _reflection("fat", "muscle") == pytest.approx(0.011, abs=0.002)
    assert 0.35 < _reflection("soft_tissue", "cortical_bone") < 0.5
    assert _reflection("soft_tissue", "air") > 0.998


def test_every_tissue_hu_mean_lies_in_its_range_and_class():
    for t in tissues.TISSUES:
        assert t.hu_range[0] <= t.hu_mean <= t.hu_range[1], t.name
        assert t.xray_material in tissues.XRAY_MATERIALS
        assert 0.0 <= t.echogenicity <= 1.0


def test_tissue_from_hu_classes_unlabelled_voxels():
    ids = tissues.tissue_from_hu(np.array([-1000.0, -100.0, 40.0, 250.0, 1200.0]))
    names = [tissues.TISSUES[i].name for i in ids]
    assert names == ["air", "fat", "soft_tissue", "cancellous_bone", "cortical_bone"]


def test_structure_names_map_to_tissues():
    assert tissues.tissue_of_structure("lung_upper_lobe_left") == "lung"
    assert tissues.tissue_of_structure("vertebrae_L3") == "cortical_bone"
    assert tissues.tissue_of_structure("kidney_right") == "kidney"
    assert tissues.tissue_of_structure("pancreas") is None


def test_unknown_tissue_and_property_raise_with_allowed_values():
    with pytest.raises(KeyError, match="known tissues"):
        tissues.tissue("unobtainium")
    with pytest.raises(ValueError, match="allowed"):
        tissues.tissue_property("name")


def _toy_patient() -> Patient:
    shape = (20, 20, 20)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[2:18, 2:18, 2:18] = 40.0
    labels = np.zeros(shape, dtype=np.int16)
    labels[5:9, 5:9, 5:9] = 1
    labels[11:15, 5:9, 5:9] = 2
    labels[5:9, 11:15, 11:15] = 3
    hu[labels > 0] = -850.0
    hu[labels == 3] = 60.0
    body = hu > -500
    body[5:15, 5:9, 5:9] = True
    names = {1: "lung_upper_lobe_left", 2: "lung_upper_lobe_right", 3: "liver"}
    return Patient("toy", hu, labels, names, np.diag([2.0, 2.0, 2.0, 1.0]), body)


def test_groups_resolve_to_members_and_missing_names_list_what_exists():
    p = _toy_patient()
    assert p.structure_ids("lungs") == [1, 2]
    assert p.structure_ids("liver") == [3]
    assert p.volume_ml("liver") == pytest.approx(4**3 * 8 / 1000)
    with pytest.raises(KeyError, match="liver"):
        p.structure_ids("spleen")


def test_tissue_map_uses_labels_then_hu_and_marks_skin():
    p = _toy_patient()
    tm = p.tissue_map
    assert tissues.TISSUES[tm[6, 6, 6]].name == "lung"
    assert tissues.TISSUES[tm[6, 12, 12]].name == "liver"
    assert tissues.TISSUES[tm[10, 12, 4]].name == "soft_tissue"
    assert tissues.TISSUES[tm[2, 10, 10]].name == "skin"
    assert tissues.TISSUES[tm[0, 0, 0]].name == "air"


def test_patient_rejects_mismatched_arrays():
    p = _toy_patient()
    with pytest.raises(ValueError, match="labels shape"):
        Patient("bad", p.hu, p.labels[:-1], p.label_names, p.affine, p.body_mask)
    with pytest.raises(ValueError, match="3-D"):
        Patient("bad", p.hu[0], p.labels[0], p.label_names, p.affine, p.body_mask[0])


def test_costal_cartilage_transmits_ultrasound_unlike_bone():
    assert tissues.tissue_of_structure("costal_cartilages") == "cartilage"
    assert (
        _reflection("soft_tissue", "cartilage") < 0.01 < _reflection("soft_tissue", "cortical_bone")
    )

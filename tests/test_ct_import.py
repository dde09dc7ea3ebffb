"""Real CT import: orientation, padding, resampling, body mask, DICOM series, bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from sonoray.assets.body_mask import body_mask_from_hu
from sonoray.assets.ct import load_ct, load_example_ct, read_names_table, resample_to_spacing

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# A small RAS volume: 1.5 x 2.0 x 2.5 mm voxels, origin at (-15, -24, -20) mm.
SHAPE = (20, 24, 16)
AFFINE_RAS = np.array(
    [[1.5, 0, 0, -15.0], [0, 2.0, 0, -24.0], [0, 0, 2.5, -20.0], [0, 0, 0, 1]], dtype=float
)
MARKER_IJK = (5, 17, 11)


def _marker_volume() -> np.ndarray:
    hu = np.full(SHAPE, 40.0, dtype=np.float32)
    hu[MARKER_IJK] = 2000.0
    return hu


def _flip(data: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Store ``data`` reversed along ``axis``; the affine still maps to the same points."""
    index_map = np.eye(4)
    index_map[axis, axis] = -1.0
    index_map[axis, 3] = data.shape[axis] - 1
    return np.flip(data, axis).copy(), affine @ index_map


def _permute(data: np.ndarray, affine: np.ndarray, perm: tuple[int, ...]):
    """Store ``data`` with axes permuted (new axis b = old axis perm[b])."""
    index_map = np.zeros((4, 4))
    for new, old in enumerate(perm):
        index_map[old, new] = 1.0
    index_map[3, 3] = 1.0
    return data.transpose(perm).copy(), affine @ index_map


def _save_nifti(path, data, affine, *, sform=True):
    img = nib.Nifti1Image(np.asarray(data), affine)
    if not sform:
        img.header.set_sform(None, code=0)
    nib.save(img, path)
    return path


def _save_raw_header(path, data, sform, pixdim=None):
    """Uncompressed NIfTI whose header holds ``sform`` and ``pixdim`` exactly as given.

    nibabel refuses to write singular affines and non-positive pixdim, so the sform is set
    without decomposition and pixdim is patched into the written bytes (offset 76).
    """
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    if sform is not None:
        header.set_sform(sform, code=1)
    nib.save(nib.Nifti1Image(data, None, header=header), path)
    if pixdim is not None:
        with open(path, "r+b") as f:
            f.seek(76 + 4)
            f.write(np.asarray(pixdim, dtype="<f4").tobytes())
    return path


def _write_dicom_series(
    folder,
    hu,
    affine_ras,
    *,
    rng,
    series_uid=None,
    skip=(),
    slope=0.5,
    intercept=-1024.0,
    pixel_spacing=None,
):
    """Write ``hu`` (I, J, K) as one DICOM file per slice k, file names in random order.

    Voxel (i, j) of slice k is pixel (row j, column i), as DICOM stores it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ affine_ras  # the same matrix converts both ways
    col_mm, row_mm = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    orientation = np.concatenate([lps[:3, 0] / col_mm, lps[:3, 1] / row_mm])
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    names = rng.permutation(hu.shape[2] * 7)[: hu.shape[2]]
    for k in range(hu.shape[2]):
        if k in skip:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = "synthetic"
        ds.Modality = "CT"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.ImagePositionPatient = [round(float(v), 4) for v in (lps @ [0, 0, k, 1])[:3]]
        ds.PixelSpacing = pixel_spacing or [round(float(row_mm), 6), round(float(col_mm), 6)]
        ds.SliceThickness = round(float(np.linalg.norm(lps[:3, 2])), 6)
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[:, :, k].T - intercept) / slope).astype(np.uint16)  # (rows, cols)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"IM{names[k]:05d}", enforce_file_format=True)
    return folder


# ----- orientation ------------------------------------------------------------------------


def _storage_variants():
    hu, affine = _marker_volume(), AFFINE_RAS
    las = _flip(hu, affine, 0)
    lps = _flip(*las, 1)
    return {
        "RAS": (hu, affine),
        "LAS": las,
        "LPS": lps,
        "SRA (permuted)": _permute(hu, affine, (2, 0, 1)),
        "IPL (flipped and permuted)": _permute(*_flip(*lps, 2), (2, 1, 0)),
    }


@pytest.mark.parametrize("variant", list(_storage_variants()))
def test_marker_lands_at_the_same_ras_position_whatever_the_storage_order(tmp_path, variant):
    data, affine = _storage_variants()[variant]
    patient = load_ct(_save_nifti(tmp_path / "ct.nii.gz", data, affine))

    expected_mm = (AFFINE_RAS @ [*MARKER_IJK, 1])[:3]
    found = np.unravel_index(np.argmax(patient.hu), patient.shape)
    np.testing.assert_allclose(patient.voxel_to_patient(found), expected_mm, atol=1e-4)
    # Canonical order: the arrays and affine come back exactly as the RAS original.
    assert patient.shape == SHAPE
    np.testing.assert_allclose(patient.affine, AFFINE_RAS, atol=1e-4)
    np.testing.assert_array_equal(patient.hu, _marker_volume())
    assert patient.meta["stored_axcodes"] == "".join(nib.aff2axcodes(affine))


@pytest.mark.parametrize("storage", ["standard LPS", "as RAS"])
def test_dicom_series_in_shuffled_files_puts_the_marker_at_its_ras_position(tmp_path, storage):
    hu, affine = _marker_volume(), AFFINE_RAS
    if storage == "standard LPS":  # rows along +y LPS (posterior), columns along +x LPS (left)
        hu, affine = _flip(*_flip(hu, affine, 0), 1)
    rng = np.random.default_rng(3)
    folder = _write_dicom_series(tmp_path / "series", hu, affine, rng=rng)

    patient = load_ct(folder)
    expected_mm = (AFFINE_RAS @ [*MARKER_IJK, 1])[:3]
    found = np.unravel_index(np.argmax(patient.hu), patient.shape)
    np.testing.assert_allclose(patient.voxel_to_patient(found), expected_mm, atol=1e-3)
    np.testing.assert_allclose(patient.affine, AFFINE_RAS, atol=1e-3)
    # Rescale slope and intercept applied: stored integers became the original HU.
    np.testing.assert_array_equal(patient.hu, _marker_volume())
    assert patient.name == "series"
    assert patient.meta["source"] == "dicom"


# ----- padding and resampling ---------------------------------------------------------------


def test_padding_values_become_air(tmp_path):
    hu = np.full(SHAPE, 40.0, dtype=np.float32)
    hu[0, 0, 0], hu[1, 0, 0], hu[2, 0, 0] = -2048.0, -3024.0, -1500.0
    hu[3, 0, 0], hu[4, 0, 0] = -1024.0, -1000.0
    patient = load_ct(_save_nifti(tmp_path / "ct.nii", hu, AFFINE_RAS))
    np.testing.assert_array_equal(patient.hu[:5, 0, 0], [-1000, -1000, -1000, -1024, -1000])
    assert patient.hu.min() >= -1024.0


def _ramp_hu(xyz_mm: np.ndarray) -> np.ndarray:
    return 100.0 + 0.5 * xyz_mm[..., 0] - 0.25 * xyz_mm[..., 1] + 0.1 * xyz_mm[..., 2]


@pytest.mark.parametrize("target", [1.7, (2.0, 1.5, 3.0)])
def test_resampling_keeps_positions_and_affine_consistent(tmp_path, target):
    # A linear HU ramp in patient mm: trilinear interpolation reproduces it exactly, so
    # any error in the new affine shows up as a wrong value.
    shape, affine = (30, 28, 12), np.diag([1.0, 1.25, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 5.0, -20.0)
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    hu = _ramp_hu(ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[8:20, 10:19, 3:8] = 5
    labels[hu.shape[0] // 2 + 5, 3, 9] = 7
    ct = _save_nifti(tmp_path / "ct.nii.gz", *_flip(hu, affine, 1))
    lab = _save_nifti(tmp_path / "labels.nii.gz", *_flip(labels, affine, 1))
    original = load_ct(ct, lab, {5: "liver", 7: "spleen"})
    patient = load_ct(ct, lab, {5: "liver", 7: "spleen"}, spacing_mm=target)

    target_mm = np.broadcast_to(np.asarray(target, float), (3,))
    np.testing.assert_allclose(patient.spacing_mm, target_mm)
    # The field of view starts at the same corner.
    np.testing.assert_allclose(
        patient.voxel_to_patient([-0.5] * 3), original.voxel_to_patient([-0.5] * 3), atol=1e-9
    )
    new_ijk = np.stack(np.meshgrid(*map(np.arange, patient.shape), indexing="ij"), -1)
    xyz = patient.voxel_to_patient(new_ijk)
    old_ijk = original.patient_to_voxel(xyz)
    inside = np.all((old_ijk >= 0) & (old_ijk <= np.array(shape) - 1), axis=-1)
    assert inside.mean() > 0.7
    np.testing.assert_allclose(patient.hu[inside], _ramp_hu(xyz[inside]), atol=1e-3)

    # Labels: nearest neighbour of each new centre on the old grid (ties skipped).
    nearest = np.clip(np.round(old_ijk).astype(int), 0, np.array(shape) - 1)
    no_tie = np.all(np.abs(old_ijk - np.floor(old_ijk) - 0.5) > 1e-6, axis=-1)
    expected = original.labels[tuple(nearest[no_tie].T)]
    np.testing.assert_array_equal(patient.labels[no_tie], expected)
    np.testing.assert_allclose(
        patient.centroid_mm("liver"), original.centroid_mm("liver"), atol=target_mm.max() / 2
    )


def test_resample_to_spacing_rejects_bad_spacing():
    hu = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError, match="spacing_mm must be"):
        resample_to_spacing(hu, hu.astype(np.int16), np.eye(4), (1.0, 0.0, 1.0))


# ----- body mask -------------------------------------------------------------------------


def _torso_on_table(gap_mm: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Elliptic torso with two lungs over a 4 mm table slab; padding outside a round field."""
    shape, spacing = (200, 160, 12), (1.0, 1.0, 2.5)
    affine = np.diag([*spacing, 1.0])
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    body = ((i - 100) / 80.0) ** 2 + ((j - 90) / 50.0) ** 2 <= 1.0
    lungs = (((np.abs(i - 100) - 35) / 22.0) ** 2 + ((j - 95) / 28.0) ** 2) <= 1.0
    bottom = 40  # lowest body row
    table = (j >= bottom - gap_mm - 4) & (j < bottom - gap_mm) & (np.abs(i - 100) < 95)
    hu2d = np.full(shape[:2], -1000.0, dtype=np.float32)
    hu2d[body] = 40.0
    hu2d[body & lungs] = -850.0
    hu2d[table] = 300.0
    hu2d[(i - 100) ** 2 + (j - 80) ** 2 > 99**2] = -2048.0
    hu = np.repeat(hu2d[:, :, None], shape[2], axis=2)
    parts = {"body": body, "table": table & ~body, "lungs": body & lungs}
    return hu, affine, parts


@pytest.mark.parametrize("gap_mm", [6.0, 0.0])
def test_body_mask_excludes_a_table_slab_and_fills_the_lungs(gap_mm):
    hu, affine, parts = _torso_on_table(gap_mm)
    mask = body_mask_from_hu(np.where(hu < -1024, -1000, hu), affine)

    assert parts["table"].any()
    for k in range(hu.shape[2]):
        assert not (mask[:, :, k] & parts["table"]).any(), "table slab inside the body mask"
        assert mask[:, :, k][parts["lungs"]].all(), "lungs must be inside the body"
    # The body outline is kept to about a voxel (square-element opening rounds its ends).
    body = np.repeat(parts["body"][:, :, None], hu.shape[2], axis=2)
    assert (mask & ~body).sum() == 0
    assert (body & ~mask).sum() < 0.002 * body.sum()
    assert ndimage.label(mask)[1] == 1


def test_body_mask_of_air_is_empty_and_bad_arguments_are_named():
    air = np.full((10, 10, 4), -1000.0, dtype=np.float32)
    assert not body_mask_from_hu(air, np.eye(4)).any()
    with pytest.raises(ValueError, match="3-D"):
        body_mask_from_hu(air[:, :, 0], np.eye(4))
    with pytest.raises(ValueError, match="detach_mm must be positive"):
        body_mask_from_hu(air, np.eye(4), detach_mm=0.0)


# ----- names tables ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_name, text",
    [
        ("ts.csv", "group,original_idx,structure,id\norgans,5,liver,5\ncardiac,1,heart,51\n"),
        ("plain.csv", "id,name\n5,liver\n51,heart\n"),
        ("bare.csv", "5,liver\n51, heart\n"),
        ("map.json", json.dumps({"5": "liver", "51": "heart", "0": "background"})),
    ],
)
def test_names_table_formats(tmp_path, file_name, text):
    (tmp_path / file_name).write_text(text)
    assert read_names_table(tmp_path / file_name) == {5: "liver", 51: "heart"}


@pytest.mark.parametrize(
    "file_name, text, match",
    [
        ("a.csv", "group,structure,code\norgans,liver,5\n", "neither a header"),
        ("b.csv", "id,label_group\n5,x\n", "no 'structure' or 'name'"),
        ("c.csv", "id,name\nfive,liver\n", "not an integer"),
        ("d.csv", "id,name\n5,liver\n5,heart\n", "named both"),
        ("e.json", "[1, 2]", "json object"),
        ("f.txt", "5 liver", "unsupported type"),
    ],
)
def test_bad_names_table_is_refused(tmp_path, file_name, text, match):
    (tmp_path / file_name).write_text(text)
    with pytest.raises(ValueError, match=match):
        read_names_table(tmp_path / file_name)


def test_structures_csv_beside_labels_is_used(tmp_path):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:6, 2:6, 2:6] = 10
    labels[8:12, 2:6, 2:6] = 12
    (tmp_path / "structures.csv").write_text(
        "group,original_idx,structure,id\norgans,10,lung_upper_lobe_left,10\n"
        "organs,12,lung_upper_lobe_right,12\n"
    )
    ct = _save_nifti(tmp_path / "ct.nii.gz", _marker_volume(), AFFINE_RAS)
    lab = _save_nifti(tmp_path / "labels.nii.gz", labels, AFFINE_RAS)
    patient = load_ct(ct, lab)
    assert patient.structure_ids("lungs") == [10, 12]
    assert patient.labels.dtype == np.int16


# ----- bad input -------------------------------------------------------------------------


def test_nonexistent_path_and_unsupported_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ct(tmp_path / "missing.nii.gz")
    (tmp_path / "scan.mha").write_bytes(b"ObjectType = Image\n")
    with pytest.raises(ValueError, match=r"unsupported file type.*\.nii\.gz.*DICOM"):
        load_ct(tmp_path / "scan.mha")
    (tmp_path / "slice.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(ValueError, match="pass the series folder"):
        load_ct(tmp_path / "slice.dcm")


def test_example_folder_without_ct_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no ct.nii.gz"):
        load_example_ct(tmp_path)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 8, 2)])
def test_ct_that_is_not_3d_is_refused(tmp_path, shape):
    path = _save_nifti(tmp_path / "ct.nii", np.zeros(shape, np.int16), np.eye(4))
    with pytest.raises(ValueError, match=rf"must be a 3-D volume, got shape \({shape[0]}, 8"):
        load_ct(path)


def test_trailing_length_one_axis_is_accepted(tmp_path):
    path = _save_nifti(tmp_path / "ct.nii", np.zeros((8, 8, 8, 1), np.int16), np.eye(4))
    assert load_ct(path).shape == (8, 8, 8)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels_are_refused(tmp_path, bad):
    hu = _marker_volume()
    hu[3, 4, 5] = bad
    path = _save_nifti(tmp_path / "ct.nii", hu, AFFINE_RAS)
    with pytest.raises(ValueError, match=r"1 NaN or infinite voxel\(s\).*\(3, 4, 5\)"):
        load_ct(path)


def test_zero_or_negative_spacing_is_refused(tmp_path):
    data = np.zeros((6, 6, 6), np.int16)
    zero = _save_raw_header(tmp_path / "zero.nii", data, np.diag([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"voxel size \[1.0, 0.0, 1.0\] mm.*must be positive"):
        load_ct(zero)
    negative = _save_raw_header(tmp_path / "neg.nii", data, None, pixdim=[1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match=r"pixdim\[1:4\] = \[1.0, -2.0, 1.0\]"):
        load_ct(negative)
    ok = _save_nifti(tmp_path / "ok.nii", data, np.eye(4))
    for spacing in (0.0, -2.0, (1.0, 1.0), (1.0, np.nan, 1.0)):
        with pytest.raises(ValueError, match="spacing_mm must be a positive number"):
            load_ct(ok, spacing_mm=spacing)


def test_singular_affine_is_refused(tmp_path):
    sform = np.array([[1.0, 1.0, 0, 0], [0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]])
    path = _save_raw_header(tmp_path / "ct.nii", np.zeros((6, 6, 6), np.int16), sform)
    with pytest.raises(ValueError, match="affine is singular"):
        load_ct(path)


def test_label_grid_that_differs_from_the_ct_is_refused(tmp_path):
    ct = _save_nifti(tmp_path / "ct.nii.gz", _marker_volume(), AFFINE_RAS)
    names = {1: "liver"}
    small = _save_nifti(tmp_path / "small.nii.gz", np.zeros((20, 24, 15), np.uint8), AFFINE_RAS)
    with pytest.raises(ValueError, match=r"shape \(20, 24, 15\).*CT has \(20, 24, 16\)"):
        load_ct(ct, small, names)
    shifted_affine = AFFINE_RAS.copy()
    shifted_affine[1, 3] += 1.0
    shifted = _save_nifti(tmp_path / "shifted.nii.gz", np.zeros(SHAPE, np.uint8), shifted_affine)
    with pytest.raises(ValueError, match=r"1.000 mm away from the CT's grid"):
        load_ct(ct, shifted, names)
    # Same voxels stored in another order are fine.
    stored = _flip(np.zeros(SHAPE, np.uint8), AFFINE_RAS, 2)
    flipped = _save_nifti(tmp_path / "flip.nii.gz", *stored)
    assert load_ct(ct, flipped, names).shape == SHAPE


def test_label_values_must_be_non_negative_integers(tmp_path):
    ct = _save_nifti(tmp_path / "ct.nii.gz", _marker_volume(), AFFINE_RAS)
    fractional = np.zeros(SHAPE, np.float32)
    fractional[1, 1, 1] = 2.5
    path = _save_nifti(tmp_path / "frac.nii.gz", fractional, AFFINE_RAS)
    with pytest.raises(ValueError, match="non-integer values"):
        load_ct(ct, path, {2: "liver"})
    negative = np.zeros(SHAPE, np.int16)
    negative[1, 1, 1] = -3
    path = _save_nifti(tmp_path / "neg.nii.gz", negative, AFFINE_RAS)
    with pytest.raises(ValueError, match=r"span \[-3, 0\]; allowed 0 to 32767"):
        load_ct(ct, path, {3: "liver"})


def test_names_table_missing_ids_lists_them(tmp_path):
    ct = _save_nifti(tmp_path / "ct.nii.gz", _marker_volume(), AFFINE_RAS)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1, 1, 1], labels[2, 2, 2], labels[3, 3, 3] = 5, 9, 14
    lab = _save_nifti(tmp_path / "labels.nii.gz", labels, AFFINE_RAS)
    with pytest.raises(ValueError, match=r"lacks ids \[9, 14\]"):
        load_ct(ct, lab, {5: "liver"})
    with pytest.raises(FileNotFoundError, match="needs a names table"):
        load_ct(ct, lab)
    with pytest.raises(ValueError, match="names was given without labels"):
        load_ct(ct, names={5: "liver"})


def test_dicom_folder_with_two_series_lists_them(tmp_path):
    rng = np.random.default_rng(0)
    hu = _marker_volume()
    _write_dicom_series(tmp_path / "s", hu, AFFINE_RAS, rng=rng, series_uid="1.2.3.1")
    _write_dicom_series(tmp_path / "s", hu + 10, AFFINE_RAS, rng=rng, series_uid="1.2.3.2")
    with pytest.raises(ValueError, match=r"holds 2 series.*'1\.2\.3\.1'.*'1\.2\.3\.2'"):
        load_ct(tmp_path / "s")
    chosen = load_ct(tmp_path / "s", series_uid="1.2.3.2")
    np.testing.assert_array_equal(chosen.hu, hu + 10)
    with pytest.raises(ValueError, match=r"series_uid '9\.9' is not in"):
        load_ct(tmp_path / "s", series_uid="9.9")


def test_dicom_series_with_a_missing_slice_names_the_gap(tmp_path):
    folder = _write_dicom_series(
        tmp_path / "s", _marker_volume(), AFFINE_RAS, rng=np.random.default_rng(1), skip=(6,)
    )
    with pytest.raises(ValueError, match=r"gap of 5\.000 mm between positions -7\.500 and -2\.500"):
        load_ct(folder)


def test_dicom_bad_folder_and_spacing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    with pytest.raises(FileNotFoundError, match="no DICOM image files"):
        load_ct(tmp_path / "empty")
    folder = _write_dicom_series(
        tmp_path / "s",
        _marker_volume(),
        AFFINE_RAS,
        rng=np.random.default_rng(2),
        pixel_spacing=[2.0, -1.5],
    )
    with pytest.raises(ValueError, match=r"PixelSpacing must be positive, got \[2.0, -1.5\]"):
        load_ct(folder)


def test_dicom_files_are_read_as_written(tmp_path):
    folder = _write_dicom_series(
        tmp_path / "s", _marker_volume(), AFFINE_RAS, rng=np.random.default_rng(4)
    )
    ds = pydicom.dcmread(sorted(folder.iterdir())[0])
    assert ds.Modality == "CT" and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


# ----- the example chest CT ---------------------------------------------------------------


@pytest.fixture(scope="module")
def chest(chest_ct_path):
    return load_example_ct(chest_ct_path)


@pytest.mark.chest_ct
def test_example_ct_loads_in_canonical_ras(chest):
    assert chest.shape == (512, 512, 133)
    np.testing.assert_allclose(chest.spacing_mm, [0.703125, 0.703125, 2.5])
    assert np.all(np.diag(chest.affine)[:3] > 0)
    np.testing.assert_allclose(chest.affine[:3, :3], np.diag(chest.spacing_mm))
    assert chest.meta["stored_axcodes"] == "LAS"
    assert chest.hu.min() >= -1024.0 and chest.hu.dtype == np.float32
    lobes = [
        "lung_lower_lobe_left",
        "lung_lower_lobe_right",
        "lung_middle_lobe_right",
        "lung_upper_lobe_left",
        "lung_upper_lobe_right",
    ]
    assert sorted(chest.label_names[i] for i in chest.structure_ids("lungs")) == lobes


@pytest.mark.chest_ct
def test_example_ct_liver_lies_right_anterior_inferior_of_the_heart(chest):
    liver, heart = chest.centroid_mm("liver"), chest.centroid_mm("heart")
    assert liver[0] > heart[0] + 50.0  # patient right
    assert liver[1] > heart[1]  # anterior (by about 5 mm in this scan)
    assert liver[2] < heart[2] - 40.0  # inferior


@pytest.mark.chest_ct
def test_example_ct_body_mask_excludes_the_table(chest):
    mask, hu = chest.body_mask, chest.hu
    assert ndimage.label(mask)[1] == 1
    # Every labelled organ lies inside the body.
    labelled = chest.labels > 0
    assert (labelled & ~mask).sum() < 1e-4 * labelled.sum()
    mid_i = chest.shape[0] // 2
    for k in range(20, 121, 10):
        column = hu[mid_i, :, k]
        table_top = int(np.flatnonzero(column > 0)[0])  # lowest dense row: the table shell
        body_low = int(np.flatnonzero(mask[mid_i, :, k])[0])
        # The table is above the threshold (a plain threshold would take it) ...
        assert (hu[:, : table_top + 1, k] > -500).sum() > 100
        # ... but no voxel of the mask reaches down to it, in any column.
        assert not mask[:, : table_top + 3, k].any()
        assert body_low > table_top + 10

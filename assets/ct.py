"""Real CT import: a NIfTI file or DICOM series plus optional organ labels -> ``Patient``.

The CT may be stored in any axis order and orientation. On import it is
reoriented to the closest canonical RAS order (``nibabel.as_closest_canonical``
on the arrays): voxel axis i points towards the patient's right, j anterior, k
superior, and the affine maps ``(i, j, k)`` to patient RAS millimetres (for an
oblique scan the axes are the nearest ones and the affine keeps the obliquity).
NIfTI world coordinates are RAS already; DICOM's LPS is converted in
:mod:`sonoray.assets.dicom`. Values below ``tissues.PADDING_BELOW_HU`` (the
-2048 or -3024 that scanners write outside the reconstructed field of view)
become air. An optional label volume in TotalSegmentator naming (Wasserthal et
al., "TotalSegmentator", Radiology: AI 2023) must lie on the CT's grid; its
names table is TotalSegmentator's csv (``group,original_idx,structure,id``), a
two-column ``id,name`` csv, a json ``{id: name}`` map or a mapping. Voxels
without a label keep id 0 and are classified from HU by ``Patient.tissue_map``.
The body mask comes from :func:`sonoray.assets.body_mask.body_mask_from_hu`.

Arrays keep the file's memory order where that saves a copy (a NIfTI volume is
Fortran-ordered, so ``hu.flags.c_contiguous`` may be false); take
``np.ascontiguousarray`` where a C buffer is needed.

Limitations: resampling is trilinear for HU and nearest for labels without an
anti-aliasing filter, so downsampling by a large factor aliases fine detail
(thin bones, vessel walls); a 4-D file is accepted only when its extra axes
have length one; when a NIfTI file has neither sform nor qform its orientation
is unknown and nibabel's default (a warning is logged) is used.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from sonoray.assets import tissues
from sonoray.assets.body_mask import body_mask_from_hu
from sonoray.assets.dicom import read_dicom_series
from sonoray.assets.patient import Patient

logger = logging.getLogger(__name__)

#: File names accepted as NIfTI volumes.
NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Label and CT grids agree when every grid corner maps within this fraction of a voxel.
GRID_TOLERANCE_VOXELS = 0.01

#: Names table file looked for beside a label volume when ``names`` is not given.
DEFAULT_NAMES_FILE = "structures.csv"

_AIR_HU = tissues.tissue("air").hu_mean
_CANONICAL = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


def load_ct(
    path: str | Path,
    labels: str | Path | None = None,
    names: str | Path | Mapping[int, str] | None = None,
    *,
    spacing_mm: float | tuple[float, float, float] | None = None,
    name: str | None = None,
    series_uid: str | None = None,
) -> Patient:
    """Load a real CT (and its organ labels) as a :class:`Patient` in canonical RAS order.

    Args:
        path: NIfTI file (``.nii``, ``.nii.gz``) or a folder holding one DICOM series.
        labels: Optional NIfTI label volume (0 = no structure) on the same grid as the CT;
            it may be stored in another axis order if it describes the same voxels.
        names: Label id -> structure name: a TotalSegmentator csv (columns ``structure``
            and ``id``), a csv of ``id,name`` (header optional), a json ``{id: name}``
            file, or a mapping. When None, ``structures.csv`` beside ``labels`` is used.
        spacing_mm: Resample to this voxel size (one number, or one per axis i, j, k
            after reorientation): trilinear for HU, nearest for labels.
        name: Patient name; default the file name without suffix (or the folder name).
        series_uid: SeriesInstanceUID to read when a DICOM folder holds several series.

    Returns:
        The patient: HU float32 with padding set to air, labels int16, the names table,
        the voxel -> RAS mm affine, the body mask, and provenance in ``meta``.

    Raises:
        FileNotFoundError: if ``path``, ``labels`` or ``names`` does not exist, or a label
            volume has no names table.
        ValueError: if the file type is unsupported, the CT is not 3-D, holds NaN or
            infinite values, has a zero or negative voxel size or a singular affine,
            ``spacing_mm`` is not positive, the label grid differs from the CT's, label
            values are not non-negative integers, the names table lacks ids present
            in the labels (listed), or a DICOM series is ambiguous or has missing slices.
    """
    target_mm = _target_spacing(spacing_mm)
    path = Path(path)
    if names is not None and labels is None:
        raise ValueError("names was given without labels; pass the label volume as labels=")

    stored, stored_affine, meta = _read_ct(path, series_uid)
    _check_affine(stored_affine, f"CT {str(path)!r}")
    meta.update(
        ct_path=str(path),
        stored_shape=tuple(int(n) for n in stored.shape),
        stored_axcodes="".join(nib.aff2axcodes(stored_affine)),
        stored_spacing_mm=tuple(float(s) for s in np.linalg.norm(stored_affine[:3, :3], axis=0)),
    )

    # One copy: reorient as a view, then convert (keeps the file's memory order).
    view, affine = _to_canonical(stored, stored_affine)
    hu = view.astype(np.float32)
    slope, inter = meta.pop("scaling", (1.0, 0.0))
    if slope != 1.0:
        hu *= np.float32(slope)
    if inter != 0.0:
        hu += np.float32(inter)
    if stored.dtype.kind == "f" and not np.isfinite(hu).all():
        bad = np.argwhere(~np.isfinite(stored))
        raise ValueError(
            f"CT {str(path)!r} holds {len(bad)} NaN or infinite voxel(s), the first at stored "
            f"index {tuple(int(v) for v in bad[0])}; CT numbers must be finite"
        )
    hu[hu < tissues.PADDING_BELOW_HU] = _AIR_HU

    if labels is None:
        label_ids = np.zeros(hu.shape, dtype=np.int16)
        label_names: dict[int, str] = {}
    else:
        label_ids, label_names = _read_labels(Path(labels), names, hu.shape, affine)
        meta["labels_path"] = str(labels)

    if target_mm is not None:
        hu, label_ids, affine = resample_to_spacing(hu, label_ids, affine, target_mm)
    body = body_mask_from_hu(hu, affine)
    return Patient(
        name=name or _default_name(path),
        hu=hu,
        labels=label_ids,
        label_names=label_names,
        affine=affine,
        body_mask=body,
        meta=meta,
    )


def load_example_ct(folder: str | Path, **kwargs) -> Patient:
    """Load a CT folder laid out as ``ct.nii.gz``, ``labels.nii.gz``, ``structures.csv``.

    The label volume and names table are optional. Keyword arguments go to :func:`load_ct`.
    """
    folder = Path(folder)
    ct = folder / "ct.nii.gz"
    if not ct.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no ct.nii.gz")
    labels = folder / "labels.nii.gz"
    kwargs.setdefault("name", folder.name)
    return load_ct(ct, labels if labels.is_file() else None, **kwargs)


def read_names_table(source: str | Path | Mapping[int, str]) -> dict[int, str]:
    """Label id -> structure name from a csv, a json file or a mapping.

    csv: TotalSegmentator's ``group,original_idx,structure,id``, or ``id,name`` with or
    without a header. json: ``{"1": "spleen", ...}``. Id 0 (background) is dropped.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the format is not one of those, an id is not a non-negative
            integer, a name is empty, or an id appears twice with different names.
    """
    if isinstance(source, Mapping):
        pairs = list(source.items())
        where = "names mapping"
    else:
        path = Path(source)
        where = f"names table {str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(f"{where} does not exist")
        if path.suffix.lower() == ".json":
            loaded = json.loads(path.read_text())
            if not isinstance(loaded, dict):
                raise ValueError(f"{where} must hold a json object {{id: name}}")
            pairs = list(loaded.items())
        elif path.suffix.lower() == ".csv":
            pairs = _csv_pairs(path, where)
        else:
            raise ValueError(f"{where}: unsupported type {path.suffix!r}; allowed: .csv, .json")

    table: dict[int, str] = {}
    for key, value in pairs:
        try:
            idx = int(str(key).strip())
        except ValueError:
            raise ValueError(f"{where}: id {key!r} is not an integer") from None
        label = str(value).strip()
        if idx < 0 or not label:
            raise ValueError(f"{where}: entry {key!r}: {value!r} needs an id >= 0 and a name")
        if table.get(idx, label) != label:
            raise ValueError(f"{where}: id {idx} is named both {table[idx]!r} and {label!r}")
        table[idx] = label
    table.pop(0, None)
    return table


def resample_to_spacing(
    hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    spacing_mm: float | tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample HU (trilinear) and labels (nearest) to a new voxel size.

    The new grid keeps the voxel axes' directions and the field of view's first corner;
    its size along each axis is the old extent divided by the new spacing, rounded.

    Args:
        hu: CT numbers ``(I, J, K)``.
        labels: Label ids on the same grid.
        affine: 4 x 4 voxel -> patient mm of that grid.
        spacing_mm: Target voxel size, one number or one per axis.

    Returns:
        ``(hu, labels, affine)`` on the new grid.
    """
    target_mm = _target_spacing(spacing_mm)
    old_mm = np.linalg.norm(affine[:3, :3], axis=0)
    scale = target_mm / old_mm
    shape = tuple(int(n) for n in np.maximum(1, np.round(np.array(hu.shape) / scale)))

    # Voxel centre i' of the new grid sits at old index (i' + 1/2) scale - 1/2; the grid is
    # axis-aligned with the old one, so trilinear = linear along each axis in turn.
    offset = 0.5 * scale - 0.5
    # Gathers along the axis that is fastest in memory are slow: do that one last, on the
    # smallest array; the other two in order of shrinkage.
    fastest = int(np.argmin(np.abs(hu.strides)))
    order = sorted((a for a in range(3) if a != fastest), key=lambda a: -scale[a]) + [fastest]
    hu_new, labels_new = hu, labels
    for axis in order:
        old_index = np.clip(np.arange(shape[axis]) * scale[axis] + offset[axis], 0, None)
        old_index = np.minimum(old_index, hu.shape[axis] - 1)
        hu_new = _linear_along(hu_new, old_index, axis)
        nearest = np.minimum(np.floor(old_index + 0.5).astype(np.intp), hu.shape[axis] - 1)
        labels_new = _take(labels_new, nearest, axis)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale
    new_affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return hu_new, labels_new, new_affine


def _linear_along(data: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``data`` at fractional ``index`` (within range) along ``axis``."""
    if data.flags.f_contiguous and not data.flags.c_contiguous:
        # np.take writes C order: work on the C-ordered transpose to avoid a transposing copy.
        return _linear_along(data.T, index, data.ndim - 1 - axis).T
    low = np.floor(index).astype(np.intp)
    high = np.minimum(low + 1, data.shape[axis] - 1)
    shape = [1, 1, 1]
    shape[axis] = len(index)
    weight = (index - low).astype(np.float32).reshape(shape)
    below = np.take(data, low, axis=axis)
    return below + weight * (np.take(data, high, axis=axis) - below)


def _take(data: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``np.take`` that keeps a Fortran-ordered array Fortran-ordered (no transposing copy)."""
    if data.flags.f_contiguous and not data.flags.c_contiguous:
        return np.take(data.T, index, axis=data.ndim - 1 - axis).T
    return np.take(data, index, axis=axis)


# ----- reading ---------------------------------------------------------------------------


def _read_ct(path: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stored values (3-D), their voxel -> RAS affine, and provenance with the scaling."""
    if not path.exists():
        raise FileNotFoundError(f"CT {str(path)!r} does not exist")
    if path.is_dir():
        hu, affine, meta = read_dicom_series(path, series_uid)
        return hu, affine, {"source": "dicom", **meta}
    if series_uid is not None:
        raise ValueError("series_uid applies only to a DICOM series folder")
    img = _load_nifti(path, "CT")
    stored = _as_3d(img.dataobj.get_unscaled(), f"CT {str(path)!r}")
    scaling = (float(img.dataobj.slope), float(img.dataobj.inter))
    return stored, img.affine.astype(np.float64), {"source": "nifti", "scaling": scaling}


def _load_nifti(path: Path, what: str) -> nib.Nifti1Image:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        hint = "; for DICOM pass the series folder" if path.suffix.lower() == ".dcm" else ""
        raise ValueError(
            f"{what} {str(path)!r}: unsupported file type; allowed: NIfTI "
            f"({', '.join(NIFTI_SUFFIXES)}) or a DICOM series folder{hint}"
        )
    try:
        img = nib.load(path)
    except Exception as err:
        raise ValueError(f"{what} {str(path)!r} is not a readable NIfTI file: {err}") from err
    header = img.header
    if header["sform_code"] == 0:
        # The affine then comes from pixdim, which nibabel silently replaces by its absolute
        # value on load: look at the header as written.
        with nib.openers.ImageOpener(path) as f:
            written = type(header).from_fileobj(f, check=False)
        pixdim = written["pixdim"][1:4]
        if not np.all(pixdim > 0):
            raise ValueError(
                f"{what} {str(path)!r}: voxel size pixdim[1:4] = {pixdim.tolist()}; "
                "each must be positive"
            )
        if header["qform_code"] == 0:
            logger.warning("%s %s has neither sform nor qform: orientation assumed", what, path)
    return img


def _read_labels(
    path: Path,
    names: str | Path | Mapping[int, str] | None,
    ct_shape: tuple[int, ...],
    ct_affine: np.ndarray,
) -> tuple[np.ndarray, dict[int, str]]:
    """Label ids on the CT's canonical grid and their names; check grid, values and names."""
    img = _load_nifti(path, "label volume")
    where = f"label volume {str(path)!r}"
    _check_affine(img.affine, where)
    stored = _as_3d(np.asanyarray(img.dataobj), where)
    view, affine = _to_canonical(stored, img.affine.astype(np.float64))
    _check_same_grid(view.shape, affine, ct_shape, ct_affine, where)
    _check_label_values(stored, where)
    present = np.flatnonzero(np.bincount(stored.ravel(order="K").astype(np.intp, copy=False)))
    ids = view.astype(np.int16)

    if names is None:
        names = path.parent / DEFAULT_NAMES_FILE
        if not names.is_file():
            raise FileNotFoundError(
                f"{where} needs a names table: pass names= (TotalSegmentator csv, id,name csv "
                f"or json) or put {DEFAULT_NAMES_FILE} beside it"
            )
    table = read_names_table(names)
    missing = [int(i) for i in present if i != 0 and int(i) not in table]
    if missing:
        raise ValueError(
            f"names table {names if isinstance(names, Mapping) else str(names)!r} lacks ids "
            f"{missing} that occur in {where}"
        )
    return ids, table


def _csv_pairs(path: Path, where: str) -> list[tuple[str, str]]:
    with path.open(newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{where} is empty")
    header = [c.strip().lower() for c in rows[0]]
    if "id" in header:
        name_col = next((c for c in ("structure", "name") if c in header), None)
        if name_col is None:
            raise ValueError(
                f"{where}: header {rows[0]} has an 'id' column but no 'structure' or 'name' column"
            )
        id_at, name_at = header.index("id"), header.index(name_col)
        rows = rows[1:]
    elif len(header) == 2:
        id_at, name_at = 0, 1
    else:
        raise ValueError(
            f"{where}: first row {rows[0]} is neither a header with 'id' and 'structure' or "
            "'name' columns nor an id,name pair"
        )
    short = [r for r in rows if len(r) <= max(id_at, name_at)]
    if short:
        raise ValueError(f"{where}: row {short[0]} has too few columns")
    return [(r[id_at], r[name_at]) for r in rows]


# ----- checks and geometry ---------------------------------------------------------------


def _target_spacing(spacing_mm) -> np.ndarray | None:
    if spacing_mm is None:
        return None
    try:
        target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,)).copy()
    except (TypeError, ValueError):
        target = np.full(3, np.nan)
    if not np.all(np.isfinite(target) & (target > 0)):
        raise ValueError(
            f"spacing_mm must be a positive number or three positive numbers, got {spacing_mm!r}"
        )
    return target


def _as_3d(data: np.ndarray, where: str) -> np.ndarray:
    """Drop trailing length-one axes; raise unless exactly three axes remain."""
    shape = data.shape
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{where} must be a 3-D volume, got shape {shape}")
    return data


def _check_affine(affine: np.ndarray, where: str) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"{where}: affine must be a finite 4 x 4 matrix, got\n{affine}")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(spacing > 0):
        raise ValueError(
            f"{where}: voxel size {spacing.tolist()} mm along axes i, j, k; each must be positive"
        )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * np.prod(spacing):
        raise ValueError(
            f"{where}: affine is singular (its voxel axes are linearly dependent):\n{affine}"
        )


def _check_same_grid(
    shape: tuple[int, ...],
    affine: np.ndarray,
    ct_shape: tuple[int, ...],
    ct_affine: np.ndarray,
    where: str,
) -> None:
    if tuple(shape) != tuple(ct_shape):
        raise ValueError(
            f"{where} has shape {tuple(shape)} in RAS order but the CT has {tuple(ct_shape)}; "
            "labels must lie on the CT's voxel grid"
        )
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    corners_h = np.vstack([corners, np.ones(corners.shape[1])])
    offset_mm = np.linalg.norm(((affine - ct_affine) @ corners_h)[:3], axis=0)
    allowed_mm = GRID_TOLERANCE_VOXELS * float(np.linalg.norm(ct_affine[:3, :3], axis=0).min())
    if offset_mm.max() > allowed_mm:
        raise ValueError(
            f"{where} lies {offset_mm.max():.3f} mm away from the CT's grid at a corner "
            f"(allowed {allowed_mm:.3f} mm); label affine\n{affine}\nCT affine\n{ct_affine}"
        )


def _check_label_values(ids: np.ndarray, where: str) -> None:
    if ids.dtype.kind == "f":
        if not np.isfinite(ids).all() or not np.array_equal(ids, np.round(ids)):
            raise ValueError(f"{where} holds non-integer values; label ids must be integers")
    elif ids.dtype.kind not in "iub":
        raise ValueError(f"{where} has dtype {ids.dtype}; label ids must be integers")
    low, high = (float(ids.min()), float(ids.max())) if ids.size else (0.0, 0.0)
    limit = np.iinfo(np.int16).max
    if low < 0 or high > limit:
        raise ValueError(f"{where}: label ids span [{low:g}, {high:g}]; allowed 0 to {limit}")


def _to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """View of ``data`` with axes flipped and permuted to the closest RAS order, and its affine."""
    ornt = orientations.io_orientation(affine)
    if np.array_equal(ornt, _CANONICAL):
        return data, affine
    view = orientations.apply_orientation(data, ornt)
    return view, affine @ orientations.inv_ornt_aff(ornt, data.shape)


def _default_name(path: Path) -> str:
    stem = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem

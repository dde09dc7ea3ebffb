"""Read a DICOM CT series (one file per slice) into CT numbers and a RAS affine.

Slices are ordered by their ImagePositionPatient projected on the slice normal
(the cross product of the ImageOrientationPatient row and column directions),
so file names and file order do not matter. Stored values become CT numbers
with each slice's RescaleSlope and RescaleIntercept. The affine follows DICOM
PS3.3 C.7.6.2.1.1 (Image Plane Module): voxel ``(i, j, k)`` = (column, row,
slice) maps to LPS millimetres, which are converted to RAS by negating x and y.

Limitations: single-frame images only (no enhanced multi-frame CT); compressed
transfer syntaxes need the pixel-data plug-ins pydicom asks for; slice spacing
must be uniform (within ``SLICE_GAP_TOLERANCE``), so a series with a missing
slice or mixed spacings is refused rather than resampled.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)

#: Largest relative deviation of a slice-to-slice distance from the series' median.
SLICE_GAP_TOLERANCE = 0.05

#: LPS (DICOM) -> RAS (NIfTI, sonoray patient frame): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_dicom_series(
    folder: str | Path, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one DICOM series from a folder (searched recursively).

    Args:
        folder: Folder holding the series' files, in any order; files that are not
            DICOM images (a DICOMDIR, stray text files) are skipped.
        series_uid: SeriesInstanceUID to read when the folder holds several series.

    Returns:
        ``(hu, affine, meta)``: CT numbers float32 ``(columns, rows, slices)``, the 4 x 4
        voxel -> RAS mm affine, and provenance (series uid and description, file count).

    Raises:
        FileNotFoundError: if ``folder`` is not a folder or holds no DICOM image.
        ValueError: if the folder holds several series and ``series_uid`` is None (the
            message lists them), ``series_uid`` is not among them, slices disagree in
            size, orientation or pixel spacing, two slices share a position, slices are
            missing (the message names the gap), or a spacing is not positive.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"DICOM series folder {str(folder)!r} does not exist")
    series = _images_by_series(folder)
    if not series:
        raise FileNotFoundError(f"no DICOM image files in {str(folder)!r}")
    uid = _choose_series(series, series_uid, folder)
    slices = series[uid]

    first = slices[0]
    _check_same(slices, "Rows")
    _check_same(slices, "Columns")
    orientation = np.array(_check_same(slices, "ImageOrientationPatient"), dtype=np.float64)
    pixel_spacing = np.array(_check_same(slices, "PixelSpacing"), dtype=np.float64)
    if getattr(first, "NumberOfFrames", 1) not in (None, 1):
        raise ValueError(
            f"series {uid} is multi-frame (NumberOfFrames={first.NumberOfFrames}); "
            "only one slice per file is supported"
        )
    if not np.all(pixel_spacing > 0):
        raise ValueError(
            f"PixelSpacing must be positive, got {pixel_spacing.tolist()} in series {uid}"
        )
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise ValueError(
            f"ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors"
        )

    # Order by position along the slice normal, then check that none is missing.
    _require(slices, "ImagePositionPatient")
    positions = np.array([s.ImagePositionPatient for s in slices], dtype=np.float64)
    order = np.argsort(positions @ normal)
    slices = [slices[i] for i in order]
    positions = positions[order]
    step_lps = _slice_step(slices, positions, normal)

    # (K, rows, columns) stored values -> CT numbers, then (columns, rows, K).
    stored = np.stack([s.pixel_array for s in slices]).astype(np.float32)
    slope = np.array([float(getattr(s, "RescaleSlope", 1.0)) for s in slices], np.float32)
    intercept = np.array([float(getattr(s, "RescaleIntercept", 0.0)) for s in slices], np.float32)
    hu = stored * slope[:, None, None] + intercept[:, None, None]
    hu = hu.transpose(2, 1, 0)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * pixel_spacing[1]  # along columns: column spacing
    affine_lps[:3, 1] = col_dir * pixel_spacing[0]  # along rows: row spacing
    affine_lps[:3, 2] = step_lps
    affine_lps[:3, 3] = positions[0]
    meta = {
        "series_uid": uid,
        "series_description": _description(first),
        "n_files": len(slices),
    }
    return hu, LPS_TO_RAS @ affine_lps, meta


def _images_by_series(folder: Path) -> dict[str, list[pydicom.Dataset]]:
    """Every DICOM file with pixel data under ``folder``, grouped by SeriesInstanceUID."""
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as err:
            logger.debug("skipping %s: %s", path, err)
            continue
        if "PixelData" not in ds:
            logger.debug("skipping %s: no pixel data", path)
            continue
        ds.filename = str(path)
        series[str(getattr(ds, "SeriesInstanceUID", ""))].append(ds)
    return dict(series)


def _choose_series(
    series: dict[str, list[pydicom.Dataset]], series_uid: str | None, folder: Path
) -> str:
    listing = "; ".join(
        f"{uid!r} ({len(dss)} files, {_description(dss[0])})" for uid, dss in series.items()
    )
    if series_uid is not None:
        if series_uid not in series:
            raise ValueError(
                f"series_uid {series_uid!r} is not in {str(folder)!r}; it holds: {listing}"
            )
        return series_uid
    if len(series) > 1:
        raise ValueError(
            f"{str(folder)!r} holds {len(series)} series; pass series_uid= one of: {listing}"
        )
    return next(iter(series))


def _description(ds: pydicom.Dataset) -> str:
    return str(getattr(ds, "SeriesDescription", "")) or "no description"


def _require(slices: list[pydicom.Dataset], keyword: str) -> None:
    for ds in slices:
        if keyword not in ds:
            raise ValueError(f"DICOM file {ds.filename!r} lacks {keyword}")


def _check_same(slices: list[pydicom.Dataset], keyword: str):
    """The value of ``keyword`` shared by all slices; raise if missing or different."""
    _require(slices, keyword)
    first = np.asarray(slices[0].data_element(keyword).value, dtype=np.float64)
    for ds in slices[1:]:
        value = np.asarray(ds.data_element(keyword).value, dtype=np.float64)
        if value.shape != first.shape or not np.allclose(value, first, atol=1e-4):
            raise ValueError(
                f"slices of one series differ in {keyword}: {first.tolist()} in "
                f"{slices[0].filename!r}, {value.tolist()} in {ds.filename!r}"
            )
    return first


def _slice_step(
    slices: list[pydicom.Dataset], positions: np.ndarray, normal: np.ndarray
) -> np.ndarray:
    """LPS vector from one slice to the next; raise on duplicates or missing slices."""
    if len(slices) == 1:
        ds = slices[0]
        thickness = float(
            getattr(ds, "SpacingBetweenSlices", 0) or getattr(ds, "SliceThickness", 0) or 0
        )
        if not thickness > 0:
            raise ValueError(
                "single-slice series needs a positive SpacingBetweenSlices or SliceThickness, "
                f"got {thickness}"
            )
        return normal * thickness

    along = positions @ normal
    gaps = np.diff(along)
    expected = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - expected) > SLICE_GAP_TOLERANCE * expected)
    if expected <= 0 or (gaps <= 1e-6 * max(1.0, abs(expected))).any():
        k = int(np.argmin(gaps))
        raise ValueError(
            f"two slices share position {along[k]:.3f} mm along the slice normal: "
            f"{slices[k].filename!r} and {slices[k + 1].filename!r}"
        )
    if bad.size:
        k = int(bad[0])
        raise ValueError(
            f"slices missing or unevenly spaced: gap of {gaps[k]:.3f} mm between positions "
            f"{along[k]:.3f} and {along[k + 1]:.3f} mm ({slices[k].filename!r} -> "
            f"{slices[k + 1].filename!r}); expected {expected:.3f} mm "
            f"(+-{SLICE_GAP_TOLERANCE:.0%}); {bad.size} such gap(s)"
        )
    return (positions[-1] - positions[0]) / (len(slices) - 1)

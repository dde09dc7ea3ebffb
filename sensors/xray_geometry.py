"""Cone-beam X-ray geometry: source, flat detector and collimated field, batched in torch.

A geometry describes B exposures at once: a point source, a flat detector (centre, row and
column directions, pixel spacing, rows x columns shared by the batch) and an optional
rectangular collimated field on the detector, all in patient millimetres (RAS). Its 3 x 4
projection matrix maps a point to the (column, row) of the pixel its ray hits, in the pinhole
camera convention of Hartley & Zisserman, *Multiple View Geometry* (2003), ch. 6.

Pixel ``(row, col)`` has its centre at
``detector_centre + (col - (cols - 1) / 2) * col_spacing * col_dir
+ (row - (rows - 1) / 2) * row_spacing * row_dir``; row 0 is the top of the image.

Display orientation (DESIGN section 2) is the caller's choice of ``row_dir`` and ``col_dir``:
an image is seen by a viewer whose gaze is ``col_dir x row_dir``.

- Frontal views (AP and PA): ``row_dir`` along the patient's inferior direction projected on
  the detector, ``col_dir`` towards the patient's left (about -x), so the viewer faces the
  patient: head up, patient's right on the viewer's left. For AP that is the view from the
  detector's side, for PA the view from the source's side.
- Other views: ``row_dir`` as above and ``col_dir = row_dir x (-beam_dir)``, the view from the
  detector's side, head up.

:func:`display_axes` computes these; :meth:`XRayGeometry.looking_at` uses it.

Limitations: one rows x columns size per batch (images must stack); the collimated field is a
rectangle centred on the detector centre; no detector tilt beyond what row/col directions give
(they must be orthonormal); no lens or panel distortion.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: Cosine of the angle from the anterior-posterior axis under which a beam counts as frontal.
FRONTAL_COS = 0.7071067811865476  # 45 degrees

#: Allowed deviation of row/col directions from orthogonality (|cos| of their angle).
ORTHOGONAL_TOL = 1e-3

_PATIENT_INFERIOR = (0.0, 0.0, -1.0)
_PATIENT_POSTERIOR = (0.0, -1.0, 0.0)


def _as_batch(value, name: str, width: int, device, dtype=torch.float32) -> torch.Tensor:
    """Turn a float, (width,) or (B, width) array-like into a (B, width) tensor."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0 and width > 1:
        t = t.expand(width)
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[-1] != width:
        raise ValueError(f"{name} must have shape ({width},) or (B, {width}), got {tuple(t.shape)}")
    return t


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def display_axes(beam_dir: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detector row and column directions that show a view as DESIGN section 2 asks.

    Head up (rows run towards the patient's feet); frontal views (beam within 45 degrees of
    the anterior-posterior axis) as if facing the patient, patient's right on the viewer's
    left; other views as seen from the detector's side. A beam along the long axis (axial
    view) shows anterior up.

    Args:
        beam_dir: (B, 3) or (3,) direction from source to detector in patient RAS.

    Returns:
        ``(row_dir, col_dir)``, each (B, 3), unit and orthogonal to ``beam_dir``.
    """
    beam = _unit(_as_batch(beam_dir, "beam_dir", 3, None))
    dev, dt = beam.device, beam.dtype
    inferior = torch.tensor(_PATIENT_INFERIOR, device=dev, dtype=dt).expand_as(beam)
    posterior = torch.tensor(_PATIENT_POSTERIOR, device=dev, dtype=dt).expand_as(beam)

    # "Down" on the image: inferior projected on the detector plane (posterior for axial beams).
    axial = beam[:, 2].abs() > 0.99
    down = torch.where(axial[:, None], posterior, inferior)
    row = _unit(down - (down * beam).sum(-1, keepdim=True) * beam)

    # The viewer's gaze is +-beam: towards posterior for frontal views, else from the detector.
    frontal = beam[:, 1].abs() >= FRONTAL_COS
    towards_posterior = torch.where(beam[:, 1:2] < 0, beam, -beam)
    gaze = torch.where(frontal[:, None], towards_posterior, -beam)
    col = torch.linalg.cross(row, gaze, dim=-1)
    return row, col


@dataclass(frozen=True)
class XRayGeometry:
    """B cone-beam exposures in patient millimetres (RAS).

    Array-likes of shape (3,) / (2,) are broadcast to the batch; tensors are stored as float32
    on the device of ``source_mm``. Row and column directions are normalised.

    Attributes:
        source_mm: (B, 3) focal spot.
        detector_centre_mm: (B, 3) centre of the detector's pixel grid.
        row_dir: (B, 3) unit direction of increasing row index (image down).
        col_dir: (B, 3) unit direction of increasing column index (image right).
        pixel_mm: (B, 2) pixel spacing (row spacing, column spacing), > 0.
        rows: Number of pixel rows (image height).
        cols: Number of pixel columns (image width).
        field_mm: (B, 2) collimated field (height along rows, width along columns) on the
            detector plane, centred on the detector centre; None for the whole detector.
    """

    source_mm: torch.Tensor
    detector_centre_mm: torch.Tensor
    row_dir: torch.Tensor
    col_dir: torch.Tensor
    pixel_mm: torch.Tensor
    rows: int
    cols: int
    field_mm: torch.Tensor | None = None

    def __post_init__(self) -> None:
        src = torch.as_tensor(self.source_mm)
        device = src.device
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        widths = {
            "source_mm": 3,
            "detector_centre_mm": 3,
            "row_dir": 3,
            "col_dir": 3,
            "pixel_mm": 2,
            "field_mm": 2,
        }
        values = {
            n: _as_batch(getattr(self, n), n, w, device)
            for n, w in widths.items()
            if getattr(self, n) is not None
        }
        batch = {n: v.shape[0] for n, v in values.items() if v.shape[0] != 1}
        if len(set(batch.values())) > 1:
            raise ValueError(f"geometry fields disagree on the batch size: {batch}")
        size = next(iter(batch.values()), 1)
        values = {n: v.expand(size, -1).contiguous() for n, v in values.items()}
        for n, v in values.items():
            if not torch.isfinite(v).all():
                raise ValueError(f"{n} must be finite, got {v.tolist()}")
        if (values["pixel_mm"] <= 0).any():
            raise ValueError(f"pixel_mm must be > 0, got {values['pixel_mm'].tolist()}")
        if "field_mm" in values and (values["field_mm"] <= 0).any():
            raise ValueError(f"field_mm must be > 0, got {values['field_mm'].tolist()}")
        for n in ("row_dir", "col_dir"):
            norm = values[n].norm(dim=-1)
            if (norm < 1e-6).any():
                raise ValueError(f"{n} must be a non-zero direction, got {values[n].tolist()}")
            values[n] = values[n] / norm[:, None]
        cos = (values["row_dir"] * values["col_dir"]).sum(-1).abs()
        if (cos > ORTHOGONAL_TOL).any():
            raise ValueError(
                f"row_dir and col_dir must be orthogonal (|cos| <= {ORTHOGONAL_TOL}), "
                f"got |cos| = {cos.tolist()}"
            )
        for n, v in values.items():
            object.__setattr__(self, n, v)
        height = (self.detector_centre_mm - self.source_mm) * self.normal
        if (height.sum(-1).abs() < 1e-3).any():
            raise ValueError("the source lies in the detector plane; it must be off the plane")

    # ----- construction ---------------------------------------------------------------------

    @classmethod
    def from_carm(
        cls,
        source_mm,
        detector_centre_mm,
        row_dir,
        col_dir,
        pixel_mm,
        rows: int,
        cols: int,
        field_mm=None,
        device=None,
    ) -> XRayGeometry:
        """Geometry from C-arm poses: source and detector positions plus detector axes.

        ``pixel_mm`` may be a float (square pixels). ``row_dir``/``col_dir`` come from the
        detector link's orientation, or from :func:`display_axes` for the standard display.
        """
        src = torch.as_tensor(source_mm, dtype=torch.float32, device=device)
        pix = torch.as_tensor(pixel_mm, dtype=torch.float32, device=src.device)
        if pix.ndim == 0:
            pix = pix.expand(2)
        return cls(src, detector_centre_mm, row_dir, col_dir, pix, rows, cols, field_mm)

    @classmethod
    def looking_at(
        cls,
        source_mm,
        detector_centre_mm,
        pixel_mm,
        rows: int,
        cols: int,
        field_mm=None,
        device=None,
    ) -> XRayGeometry:
        """Detector facing the source, axes chosen by :func:`display_axes`."""
        src = _as_batch(source_mm, "source_mm", 3, device)
        det = _as_batch(detector_centre_mm, "detector_centre_mm", 3, src.device)
        row, col = display_axes(det - src)
        return cls.from_carm(src, det, row, col, pixel_mm, rows, cols, field_mm)

    @classmethod
    def from_isocentre(
        cls,
        isocentre_mm,
        beam_dir,
        *,
        source_to_isocentre_mm=530.0,
        source_to_detector_mm=1020.0,
        detector_mm=300.0,
        pixels: int = 256,
        field_mm=None,
        device=None,
    ) -> XRayGeometry:
        """A square-detector C-arm exposure aimed along ``beam_dir`` through an isocentre.

        Defaults are the mobile C-arm of FACTS.md (source-to-detector 1020 mm,
        source-to-isocentre 530 mm, 300 mm detector).
        """
        iso = _as_batch(isocentre_mm, "isocentre_mm", 3, device)
        beam = _unit(_as_batch(beam_dir, "beam_dir", 3, iso.device))
        if not 0 < source_to_isocentre_mm < source_to_detector_mm:
            raise ValueError(
                f"need 0 < source_to_isocentre_mm ({source_to_isocentre_mm}) < "
                f"source_to_detector_mm ({source_to_detector_mm})"
            )
        src = iso - source_to_isocentre_mm * beam
        det = src + source_to_detector_mm * beam
        return cls.looking_at(src, det, detector_mm / pixels, pixels, pixels, field_mm)

    # ----- derived quantities ---------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.source_mm.shape[0]

    @property
    def device(self) -> torch.device:
        return self.source_mm.device

    @property
    def normal(self) -> torch.Tensor:
        """(B, 3) unit detector normal ``col_dir x row_dir`` (the viewer's gaze)."""
        return _unit(torch.linalg.cross(self.col_dir, self.row_dir, dim=-1))

    @property
    def beam_dir(self) -> torch.Tensor:
        """(B, 3) unit direction of the central ray, source to detector centre."""
        return _unit(self.detector_centre_mm - self.source_mm)

    @property
    def source_to_detector_mm(self) -> torch.Tensor:
        """(B,) distance from the source to the detector centre."""
        return (self.detector_centre_mm - self.source_mm).norm(dim=-1)

    @property
    def detector_size_mm(self) -> torch.Tensor:
        """(B, 2) detector height and width."""
        size = torch.tensor([self.rows, self.cols], dtype=torch.float32, device=self.device)
        return self.pixel_mm * size

    @property
    def field_size_mm(self) -> torch.Tensor:
        """(B, 2) collimated field height and width on the detector (the detector if open)."""
        return self.detector_size_mm if self.field_mm is None else self.field_mm

    def pixel_centres_mm(self) -> torch.Tensor:
        """(B, rows, cols, 3) pixel centres in patient mm."""
        dev = self.device
        r = torch.arange(self.rows, device=dev, dtype=torch.float32) - (self.rows - 1) / 2
        c = torch.arange(self.cols, device=dev, dtype=torch.float32) - (self.cols - 1) / 2
        r_mm = r[None, :] * self.pixel_mm[:, 0:1]  # (B, rows)
        c_mm = c[None, :] * self.pixel_mm[:, 1:2]  # (B, cols)
        return (
            self.detector_centre_mm[:, None, None, :]
            + r_mm[:, :, None, None] * self.row_dir[:, None, None, :]
            + c_mm[:, None, :, None] * self.col_dir[:, None, None, :]
        )

    def field_mask(self) -> torch.Tensor:
        """(B, rows, cols) bool: pixels whose centre lies inside the collimated field."""
        dev = self.device
        r = torch.arange(self.rows, device=dev, dtype=torch.float32) - (self.rows - 1) / 2
        c = torch.arange(self.cols, device=dev, dtype=torch.float32) - (self.cols - 1) / 2
        half = self.field_size_mm / 2  # (B, 2)
        in_r = (r[None, :] * self.pixel_mm[:, 0:1]).abs() <= half[:, 0:1] + 1e-4
        in_c = (c[None, :] * self.pixel_mm[:, 1:2]).abs() <= half[:, 1:2] + 1e-4
        return in_r[:, :, None] & in_c[:, None, :]

    def projection_matrix(self) -> torch.Tensor:
        """(B, 3, 4) matrix P with ``P @ [x, y, z, 1] ~ [col, row, 1]`` (homogeneous).

        The third coordinate of the product is the point's distance from the source along the
        detector normal divided by the source-to-detector-plane distance (positive in front
        of the source).
        """
        n = self.normal
        s = self.source_mm
        offset = s - self.detector_centre_mm  # (B, 3)
        depth = ((self.detector_centre_mm - s) * n).sum(-1, keepdim=True)  # (B, 1)
        w_row = torch.cat([n, -(n * s).sum(-1, keepdim=True)], -1) / depth  # (B, 4)
        out = []
        for axis, centre, d in (
            (1, (self.cols - 1) / 2, self.col_dir),
            (0, (self.rows - 1) / 2, self.row_dir),
        ):
            spacing = self.pixel_mm[:, axis : axis + 1]
            shift = centre + (d * offset).sum(-1, keepdim=True) / spacing
            direct = torch.cat([d, -(d * s).sum(-1, keepdim=True)], -1) / spacing
            out.append(shift * w_row + direct)
        return torch.stack([out[0], out[1], w_row], dim=1)

    def project(self, points_mm: torch.Tensor) -> torch.Tensor:
        """Pixel coordinates ``(col, row)`` where the rays through points hit the detector.

        Args:
            points_mm: (N, 3) shared or (B, N, 3) per item, patient mm.

        Returns:
            (B, N, 2) fractional ``(col, row)``; integer values are pixel centres. Points
            behind the source give NaN.
        """
        pts = torch.as_tensor(points_mm, dtype=torch.float32, device=self.device)
        if pts.ndim == 2:
            pts = pts.unsqueeze(0).expand(self.batch_size, -1, -1)
        if pts.ndim != 3 or pts.shape[-1] != 3 or pts.shape[0] != self.batch_size:
            raise ValueError(
                f"points_mm must be (N, 3) or ({self.batch_size}, N, 3), got {tuple(pts.shape)}"
            )
        p = self.projection_matrix()
        h = pts @ p[:, :, :3].transpose(1, 2) + p[:, None, :, 3]  # (B, N, 3)
        w = h[..., 2:3]
        return torch.where(w > 0, h[..., :2] / w, torch.full_like(h[..., :2], float("nan")))

    # ----- batching -------------------------------------------------------------------------

    def __getitem__(self, index) -> XRayGeometry:
        """Sub-batch (an int keeps a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda t: t[index])

    def to(self, device) -> XRayGeometry:
        return self._map(lambda t: t.to(device))

    @staticmethod
    def cat(geometries: list[XRayGeometry]) -> XRayGeometry:
        """Concatenate geometries of one image size into one batch."""
        first = geometries[0]
        sizes = {(g.rows, g.cols) for g in geometries}
        if len(sizes) != 1:
            raise ValueError(f"geometries must share rows x cols to batch, got {sorted(sizes)}")
        opened = [g.field_mm is None for g in geometries]
        kwargs = {}
        for f in fields(XRayGeometry):
            if f.name in ("rows", "cols"):
                kwargs[f.name] = getattr(first, f.name)
            elif f.name == "field_mm" and all(opened):
                kwargs[f.name] = None
            elif f.name == "field_mm":
                kwargs[f.name] = torch.cat([g.field_size_mm for g in geometries])
            else:
                kwargs[f.name] = torch.cat([getattr(g, f.name) for g in geometries])
        return XRayGeometry(**kwargs)

    def _map(self, fn) -> XRayGeometry:
        kwargs = {f.name: getattr(self, f.name) for f in fields(XRayGeometry)}
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                kwargs[name] = fn(value)
        return XRayGeometry(**kwargs)

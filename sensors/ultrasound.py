"""B-mode ultrasound images from a patient's tissue map, batched over probe poses, in torch.

Each scan line of the probe (see :mod:`sonoray.sensors.probes` for the probe
frame: origin at the centre of the face, +z = depth, +x = lateral with the
marker at -x, +y = elevation) is sampled at regular depths. Every sample takes
the tissue of the nearest voxel and that tissue's acoustic impedance Z,
attenuation slope alpha (dB/cm/MHz, one way) and echogenicity from
:mod:`sonoray.assets.tissues`. Along each line, in the convolution ray-tracing
manner of Burger et al. (IEEE TMI 2013) and Salehi et al. (MICCAI 2015):

- an interface between samples with impedances Z1 (above) and Z2 echoes with
  amplitude r = (Z2 - Z1) / (Z2 + Z1); it passes on the intensity fraction
  1 - R, R = r^2, and the one-way intensity transmission T (the product of
  1 - R above a depth, times the line's coupling) is also the round-trip
  amplitude factor, so bone and gas shadow what lies beneath;
- the round trip to depth z loses 2 x integral(alpha) x f dB; amplitudes are
  multiplied by 10^(-dB / 20), and brightness in dB is 20 log10(envelope);
- diffuse scatter (speckle) comes from a complex Gaussian scatterer field fixed
  in patient coordinates (two seeded, smoothed, periodic random volumes of
  incommensurate periods, sampled trilinearly at the samples' patient
  positions), so it moves with the anatomy when the probe moves; its amplitude
  is ``BACKSCATTER_AMPLITUDE`` x echogenicity;
- specular echoes and scatter are convolved (as complex baseband, i.e. in the
  envelope domain) with a separable point-spread function: along depth a
  Gaussian pulse envelope from the probe's bandwidth, across lines a Gaussian
  beam of width wavelength x F-number, each widened to the output pixel so that
  the scan conversion does not alias; the envelope is the modulus;
- time-gain compensation (a nominal attenuation, or none), a gain, and log
  compression over a dynamic range with a fixed reference: 0 dB after gain is
  white, -dynamic range is black, so brightness never adapts to the image;
- scan conversion to a fan (convex) or rectangle (linear) of H x W pixels,
  zero outside the sector. Row 0 is at the probe face (the top of the arc for a
  convex probe), depth grows downwards, column 0 is on the marker side.

Alongside the image come a per-pixel confidence (the intensity reaching that
depth relative to a line through nominal soft tissue, clipped to [0, 1], scan
converted like the image) and, on request, the mask of chosen label ids in
image space. Lines whose coupling is 0 see air (the probe-air interface
reflects R ~ 1) and are dark; air between the face and the skin within
``coupling_gel_mm`` of the face counts as gel on coupled lines.

Limitations: depth is geometric (one speed of sound; no refraction, no range
or phase aberration); interface echoes do not depend on the angle of incidence
and voxel staircases of oblique interfaces echo like flat steps; no multiple
reflections (no reverberation or A-lines under the pleura), no electronic
noise; attenuation does not shift the pulse's frequency; HU enters only
through the tissue map (unlabelled voxels are classified from HU), not as
texture within a tissue; speckle grains are never finer than the output pixel
and the scatterer field is isotropic with the correlation of the elevation
beam, so speckle is not elongated laterally as on real scanners;
``BACKSCATTER_AMPLITUDE`` is tuned so that organ boundaries stand out of
parenchymal speckle as in clinical images, not measured.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sonoray.assets import tissues
from sonoray.sensors.probes import ProbePreset, get_preset, scan_lines

#: Physical and model constants, each with where it comes from.
CONSTANTS = {
    # Speckle RMS amplitude of echogenicity-1 tissue relative to a perfect specular reflector
    # (r = 1). Tuned (approx.): liver speckle sits about 20 dB under a fat/muscle interface.
    "backscatter_amplitude": 0.02,
    # Tissue whose attenuation the default time-gain compensation and the confidence assume
    # (0.5 dB/cm/MHz, the usual average for soft tissue; tissue table).
    "nominal_tissue": "liver",
    # Medium matched to the probe's lens: it lies in front of the first sample, and fills a
    # small gap between a coupled face and the skin (coupling gel ~ water).
    "gel_tissue": "water",
    # Scatterer-field correlation sigma as a fraction of the probe's elevation -6 dB width at
    # the lens focus (approx.: the slice is thinnest there and wider elsewhere); 0.7 keeps
    # speckle correlated (> 0.8) over 0.2 mm moves in any direction, as real speckle is.
    "speckle_sigma_per_elevation_width": 0.7,
    # Gaussian sigma (in output pixels) of the display's anti-aliasing blur.
    "display_sigma_px": 0.5,
}
BACKSCATTER_AMPLITUDE = CONSTANTS["backscatter_amplitude"]

#: Side lengths (voxels) of the two periodic speckle volumes; coprime so the sum never repeats
#: within any imaged region.
_SPECKLE_TILE_VOXELS = (89, 97)
#: Smoothing sigma of the speckle volumes in voxels (>= 1.5 keeps trilinear sampling stationary).
_SPECKLE_TILE_SIGMA_VOXELS = 1.5
#: Cells per side of the grid that measures a target's cross-section on the image plane (over
#: twice the sector's extent).
_PLANE_GRID_CELLS = 96
#: Floor of loss factors (intensity or amplitude), and the same in dB: far below any dynamic
#: range, and it keeps float32 out of denormal numbers, whose arithmetic is ~100x slower on CPUs.
_FLOOR = 1e-15
_FLOOR_DB = 150.0
#: Rotation tolerance for probe poses (max |R^T R - I|).
_ROTATION_TOL = 1e-3


@dataclass(frozen=True)
class BModeSettings:
    """Imaging parameters of a B-mode rendering.

    Attributes:
        image_shape: Output (H, W) in pixels.
        depth_mm: Imaging depth along each scan line; ``None`` takes the preset's.
        dynamic_range_db: Span of the log compression: -dynamic_range_db maps to 0, 0 dB to 255.
        gain_db: Gain added before log compression.
        tgc_db_cm_mhz: Time-gain compensation as an attenuation slope (dB/cm/MHz one way;
            the gain at depth z is 2 x slope x f x z dB); ``None`` turns it off. The default
            is the nominal tissue's attenuation (liver, 0.5).
        speckle: Add diffuse scatter (off: specular echoes only).
        psf: Convolve with the point-spread function (off: each sample is its own echo).
        keep_aspect: Square pixels, the sector fitted into H x W (top-aligned, centred
            laterally); else the sector's bounding box is stretched to H x W.
        samples_per_pixel: Depth samples per output row along each line.
        coupling_gel_mm: On coupled lines, air this close to the face counts as gel.
        speckle_seed: Seed of the scatterer field.
    """

    image_shape: tuple[int, int] = (128, 128)
    depth_mm: float | None = None
    dynamic_range_db: float = 60.0
    gain_db: float = 12.0
    tgc_db_cm_mhz: float | None = float(
        tissues.tissue(CONSTANTS["nominal_tissue"]).attenuation_db_cm_mhz
    )
    speckle: bool = True
    psf: bool = True
    keep_aspect: bool = True
    samples_per_pixel: float = 1.5
    coupling_gel_mm: float = 3.0
    speckle_seed: int = 0

    def __post_init__(self) -> None:
        shape = tuple(self.image_shape)
        if len(shape) != 2 or any(int(s) != s or s < 2 for s in shape):
            raise ValueError(f"image_shape must be two integers >= 2, got {self.image_shape!r}")
        checks = (
            ("depth_mm", self.depth_mm, self.depth_mm is None),
            ("dynamic_range_db", self.dynamic_range_db, False),
            ("samples_per_pixel", self.samples_per_pixel, False),
        )
        for name, value, skip in checks:
            if not skip and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value!r}")
        if self.tgc_db_cm_mhz is not None and not (
            math.isfinite(self.tgc_db_cm_mhz) and self.tgc_db_cm_mhz >= 0
        ):
            raise ValueError(f"tgc_db_cm_mhz must be None or >= 0, got {self.tgc_db_cm_mhz!r}")
        if not math.isfinite(self.gain_db):
            raise ValueError(f"gain_db must be finite, got {self.gain_db!r}")
        if not (math.isfinite(self.coupling_gel_mm) and self.coupling_gel_mm >= 0):
            raise ValueError(f"coupling_gel_mm must be >= 0, got {self.coupling_gel_mm!r}")


@dataclass
class BModeFrame:
    """B B-mode frames and what comes with them.

    Attributes:
        image: uint8 ``(B, H, W)``; row 0 at the probe face, column 0 on the marker side.
        confidence: float32 ``(B, H, W)`` in [0, 1]; 0 outside the sector.
        target_mask: bool ``(B, H, W)``: pixels in the sector whose label is a target id
            (``None`` when no target ids were asked for).
        target_plane_area_mm2: float32 ``(B,)``: the targets' cross-section on the whole
            image plane (inside the sector or not), sampled on a grid of 96 x 96 cells
            over twice the sector's extent (``None`` without target ids).
        envelope: float32 ``(B, L, S)``: envelope per line and depth sample after TGC, as a
            fraction of the echo of a perfect reflector at the face.
        line_confidence: float32 ``(B, L, S)``: confidence per line and depth sample.
        sector_mask: bool ``(H, W)``: pixels inside the imaged sector.
        pixel_size_mm: (row, column) pixel size.
    """

    image: torch.Tensor
    confidence: torch.Tensor
    target_mask: torch.Tensor | None
    target_plane_area_mm2: torch.Tensor | None
    envelope: torch.Tensor
    line_confidence: torch.Tensor
    sector_mask: torch.Tensor
    pixel_size_mm: tuple[float, float]


def check_probe_poses(probe_in_patient, device=None) -> torch.Tensor:
    """Validate probe poses and return them as float32 ``(B, 4, 4)`` on ``device``.

    Raises:
        ValueError: for a shape other than (B, 4, 4), non-finite entries, a last row other
            than (0, 0, 0, 1), or a rotation part that is not a proper rotation.
    """
    pose = torch.as_tensor(probe_in_patient)
    if pose.ndim != 3 or pose.shape[1:] != (4, 4) or pose.shape[0] < 1:
        raise ValueError(f"probe_in_patient must have shape (B, 4, 4), got {tuple(pose.shape)}")
    pose = pose.to(dtype=torch.float64)
    if not torch.isfinite(pose).all():
        raise ValueError("probe_in_patient has NaN or infinite entries")
    bottom = pose.new_tensor([0.0, 0.0, 0.0, 1.0])
    if not torch.allclose(pose[:, 3], bottom.expand(pose.shape[0], 4)):
        raise ValueError(f"probe_in_patient last row must be (0, 0, 0, 1), got {pose[:, 3]}")
    rot = pose[:, :3, :3]
    identity = torch.eye(3, dtype=rot.dtype, device=rot.device)
    orth_err = (rot.transpose(1, 2) @ rot - identity).abs().amax((1, 2))
    det = torch.linalg.det(rot)
    bad = (orth_err > _ROTATION_TOL) | (det < 0)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"probe_in_patient[{i}] rotation is not a proper rotation (|R^T R - I| = "
            f"{float(orth_err[i]):.3g}, det = {float(det[i]):.3g}; allowed: orthonormal, det +1)"
        )
    return pose.to(dtype=torch.float32, device=device)


class BModeSimulator:
    """Renders B-mode frames of one patient grid for batches of probe poses.

    The tissue (and label) volumes, lookup tables, speckle volumes, scan-line
    samples and the scan-conversion grid live on ``device`` and are built once;
    each :meth:`render` call takes B poses.

    Args:
        volume: A ``Patient`` (its ``tissue_map``, ``labels`` and ``affine`` are used), a
            sequence of Patients on one grid, or tissue ids (indices into
            ``tissues.TISSUES``) as ``(I, J, K)`` or ``(V, I, J, K)`` integers.
        preset: Probe preset name or :class:`~sonoray.sensors.probes.ProbePreset`.
        affine: Voxel -> patient mm, ``(4, 4)`` or ``(V, 4, 4)``; required for raw volumes.
        labels: Structure ids on the same grid (for target masks); optional.
        settings: :class:`BModeSettings`; defaults if ``None``.
        device: Torch device; defaults to the volume's (CPU for arrays).

    Raises:
        ValueError: for bad shapes, tissue ids outside the table, a singular or non-finite
            affine, or an unknown preset.
    """

    def __init__(
        self,
        volume,
        preset: str | ProbePreset = "convex",
        *,
        affine=None,
        labels=None,
        settings: BModeSettings | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.preset = get_preset(preset)
        self.settings = settings if settings is not None else BModeSettings()
        tissue_ids, labels, affine, device = _unpack_volume(volume, affine, labels, device)
        self.device = torch.device(device)
        self.depth_mm = float(self.settings.depth_mm or self.preset.depth_mm)
        self._set_volumes(tissue_ids, labels, affine)
        self._set_tissue_tables()
        self._set_geometry()
        self._set_psf()
        self._set_speckle()

    # ----- construction ---------------------------------------------------------------------

    def _set_volumes(self, tissue_ids: torch.Tensor, labels, affine: torch.Tensor) -> None:
        n_tissues = len(tissues.TISSUES)
        if tissue_ids.ndim == 3:
            tissue_ids = tissue_ids[None]
        if tissue_ids.ndim != 4:
            raise ValueError(
                f"tissue ids must be (I, J, K) or (V, I, J, K), got {tuple(tissue_ids.shape)}"
            )
        if tissue_ids.dtype.is_floating_point or tissue_ids.dtype == torch.bool:
            raise ValueError(f"tissue ids must be integers, got {tissue_ids.dtype}")
        lo, hi = int(tissue_ids.min()), int(tissue_ids.max())
        if lo < 0 or hi >= n_tissues:
            raise ValueError(f"tissue ids must lie in [0, {n_tissues - 1}], got [{lo}, {hi}]")
        self.n_volumes = tissue_ids.shape[0]
        self.grid_shape = tuple(tissue_ids.shape[1:])
        # One voxel of padding (air, label 0) on every side: clamping a coordinate onto the
        # padding replaces a bounds test, so points outside the grid read the padding.
        air = tissues.TISSUE_IDS["air"]
        self._tissue_flat = _pad_flat(tissue_ids.to(self.device, torch.uint8), air)
        self._label_flat = None
        if labels is not None:
            labels = torch.as_tensor(labels)
            labels = labels[None] if labels.ndim == 3 else labels
            if tuple(labels.shape) != tuple(tissue_ids.shape):
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} differs from tissue ids shape "
                    f"{tuple(tissue_ids.shape)}"
                )
            small = labels.numel() == 0 or int(labels.max()) <= torch.iinfo(torch.int16).max
            dtype = torch.int16 if small else torch.int32
            self._label_flat = _pad_flat(labels.to(self.device, dtype), 0)

        affine = torch.as_tensor(affine, dtype=torch.float64)
        affine = affine[None] if affine.ndim == 2 else affine
        if affine.shape[1:] != (4, 4) or affine.shape[0] not in (1, self.n_volumes):
            raise ValueError(
                f"affine must be (4, 4) or ({self.n_volumes}, 4, 4), got {tuple(affine.shape)}"
            )
        if (
            not torch.isfinite(affine).all()
            or (torch.linalg.det(affine[:, :3, :3]).abs() < 1e-9).any()
        ):
            raise ValueError("affine must be finite and invertible")
        to_padded = torch.eye(4, dtype=torch.float64)
        to_padded[:3, 3] = 1.5  # one voxel of padding, plus 0.5 so that floor() rounds
        inverse = (to_padded @ torch.linalg.inv(affine)).expand(self.n_volumes, 4, 4)
        self._patient_to_voxel = inverse.to(self.device, torch.float32).contiguous()
        padded = [n + 2 for n in self.grid_shape]
        strides = [padded[1] * padded[2], padded[2], 1]
        self._voxel_strides = torch.tensor(strides, dtype=torch.float64, device=self.device)
        self._voxel_upper = torch.tensor(padded, dtype=torch.float32, device=self.device) - 1
        self._volume_stride = int(np.prod(padded))

    def _set_tissue_tables(self) -> None:
        fields = ("impedance_mrayl", "attenuation_db_cm_mhz", "echogenicity")
        table = np.stack([tissues.tissue_property(f) for f in fields])
        self._tissue_table = torch.as_tensor(table, device=self.device)  # (3, T)
        self._air_id = tissues.TISSUE_IDS["air"]
        self._gel_id = tissues.TISSUE_IDS[CONSTANTS["gel_tissue"]]
        self._face_impedance = float(tissues.tissue(CONSTANTS["gel_tissue"]).impedance_mrayl)
        nominal = tissues.tissue(CONSTANTS["nominal_tissue"])
        self._nominal_alpha = float(nominal.attenuation_db_cm_mhz)

    def _set_geometry(self) -> None:
        p, s = self.preset, self.settings
        height, width = (int(v) for v in s.image_shape)
        n_lines = p.n_elements

        # Sector bounding box in the probe's x-z plane.
        origins, directions = scan_lines(p)
        ends = origins + self.depth_mm * directions
        corners = torch.cat([origins, ends])
        x_lo, x_hi = float(corners[:, 0].min()), float(corners[:, 0].max())
        z_lo, z_hi = float(origins[:, 2].min()), self.depth_mm
        px_x, px_z = (x_hi - x_lo) / width, (z_hi - z_lo) / height
        if s.keep_aspect:
            px_x = px_z = max(px_x, px_z)
        self.pixel_size_mm = (px_z, px_x)  # (row, column)

        rows = z_lo + (torch.arange(height, dtype=torch.float64) + 0.5) * px_z
        cols = (
            0.5 * (x_lo + x_hi)
            + (torch.arange(width, dtype=torch.float64) - 0.5 * (width - 1)) * px_x
        )
        zz, xx = torch.meshgrid(rows, cols, indexing="ij")
        pixels = torch.stack([xx, torch.zeros_like(xx), zz], dim=-1)  # (H, W, 3)
        self.pixel_positions_mm = pixels.to(self.device, torch.float32)

        n_samples = int(math.ceil(self.depth_mm * s.samples_per_pixel / px_z)) + 1
        self.sample_spacing_mm = self.depth_mm / (n_samples - 1)
        depths = torch.arange(n_samples, dtype=torch.float64) * self.sample_spacing_mm
        self.sample_depths_mm = depths.to(self.device, torch.float32)
        self._line_origins = origins.T.contiguous().to(self.device, torch.float32)  # (3, L)
        self._line_directions = directions.T.contiguous().to(self.device, torch.float32)
        self.n_lines, self.n_samples = n_lines, n_samples

        # Scan conversion: each pixel's fractional (line, sample) position.
        if p.is_convex:
            zc = zz + p.radius_mm
            line = torch.atan2(xx, zc) / p.line_angle_step_rad + 0.5 * (n_lines - 1)
            sample = (torch.hypot(xx, zc) - p.radius_mm) / self.sample_spacing_mm
        else:
            line = xx / p.pitch_mm + 0.5 * (n_lines - 1)
            sample = zz / self.sample_spacing_mm
        inside = (line >= 0) & (line <= n_lines - 1) & (sample >= 0) & (sample <= n_samples - 1)
        self.sector_mask = inside.to(self.device)
        grid = torch.stack(
            [2.0 * sample / (n_samples - 1) - 1.0, 2.0 * line / (n_lines - 1) - 1.0], dim=-1
        )
        self._scan_grid = grid[None].to(self.device, torch.float32)  # (1, H, W, 2)
        self._sector_pixels = torch.nonzero(inside.reshape(-1))[:, 0].to(self.device)
        sector_points = pixels.reshape(-1, 3)[inside.reshape(-1)]
        self.sector_area_mm2 = float(inside.sum()) * px_x * px_z

        # Coarse grid over twice the sector's extent for the targets' whole cross-section.
        n = _PLANE_GRID_CELLS
        cell_x, cell_z = 2.0 * (x_hi - x_lo) / n, 2.0 * (z_hi - z_lo) / n
        centre = torch.arange(n, dtype=torch.float64) - 0.5 * (n - 1)
        gz, gx = torch.meshgrid(
            0.5 * (z_lo + z_hi) + centre * cell_z,
            0.5 * (x_lo + x_hi) + centre * cell_x,
            indexing="ij",
        )
        plane = torch.stack([gx, torch.zeros_like(gx), gz], dim=-1).reshape(-1, 3)
        points = torch.cat([sector_points, plane])
        self._target_points = points.T.contiguous().to(self.device, torch.float32)  # (3, N)
        self._n_sector = sector_points.shape[0]
        self._plane_cell_mm2 = cell_x * cell_z

        f = p.center_frequency_mhz
        depth_cm = self.sample_depths_mm / 10.0
        tgc_db = 2.0 * (s.tgc_db_cm_mhz or 0.0) * f * depth_cm
        self._tgc_gain = 10.0 ** (tgc_db / 20.0)  # (S,)
        self._nominal_loss_db = self._nominal_alpha * f * depth_cm  # (S,) one way

    def _set_psf(self) -> None:
        p, s = self.preset, self.settings
        self._axial_kernel = self._lateral_kernel = None
        if not s.psf:
            return
        px_z, px_x = self.pixel_size_mm
        display = CONSTANTS["display_sigma_px"]
        axial_mm = math.hypot(p.axial_sigma_mm, display * px_z)
        lateral_mm = math.hypot(p.lateral_sigma_mm, display * px_x)
        line_spacing_mm = (
            (p.radius_mm + 0.5 * self.depth_mm) * p.line_angle_step_rad
            if p.is_convex
            else p.pitch_mm
        )
        # Axial kernel peaks at 1 (an interface echoes with amplitude r); lateral sums to 1
        # (a plane interface across many lines keeps amplitude r).
        axial = _gaussian_kernel(axial_mm / self.sample_spacing_mm)
        lateral = _gaussian_kernel(lateral_mm / line_spacing_mm)
        self._axial_kernel = (axial / axial.max()).tolist()
        self._lateral_kernel = (lateral / lateral.sum()).tolist()

    def _set_speckle(self) -> None:
        s = self.settings
        self._speckle_tiles = []
        if not s.speckle:
            return
        sigma_mm = CONSTANTS["speckle_sigma_per_elevation_width"] * self.preset.elevation_width_mm
        self.speckle_sigma_mm = sigma_mm
        self._speckle_voxel_mm = sigma_mm / _SPECKLE_TILE_SIGMA_VOXELS
        seeds = np.random.SeedSequence(s.speckle_seed).generate_state(len(_SPECKLE_TILE_VOXELS) + 1)
        for n, seed in zip(_SPECKLE_TILE_VOXELS, seeds[:-1], strict=True):
            tile = _smooth_periodic_noise(n, _SPECKLE_TILE_SIGMA_VOXELS, int(seed))
            self._speckle_tiles.append((n, tile.to(self.device)))
        # Each volume of a batch gets its own far-away stretch of the scatterer field.
        rng = np.random.default_rng(int(seeds[-1]))
        offsets = rng.uniform(0.0, 1e4, size=(self.n_volumes, 3))
        self._speckle_offsets_mm = torch.as_tensor(offsets, dtype=torch.float32, device=self.device)

    # ----- rendering ------------------------------------------------------------------------

    @torch.no_grad()
    def render(
        self,
        probe_in_patient,
        coupling=None,
        target_ids: Sequence[int] | torch.Tensor | None = None,
        volume_index=None,
    ) -> BModeFrame:
        """Render B frames.

        Args:
            probe_in_patient: ``(B, 4, 4)`` probe poses in patient RAS mm.
            coupling: ``(B, L)`` per-line coupling in [0, 1] (bool or float; fraction of the
                line's aperture in contact); ``None`` = fully coupled.
            target_ids: Label ids whose pixels form ``target_mask``; needs labels.
            volume_index: ``(B,)`` volume per pose; default: the one volume for every pose,
                or pose b in volume b when there are B volumes.

        Returns:
            A :class:`BModeFrame`.
        """
        pose = check_probe_poses(probe_in_patient, self.device)
        batch = pose.shape[0]
        volume_index = self._check_volume_index(volume_index, batch)
        coupling = self._check_coupling(coupling, batch)
        patient_to_voxel = self._patient_to_voxel[volume_index]  # (B, 4, 4)
        probe_to_voxel = patient_to_voxel @ pose

        voxels = self._line_points(probe_to_voxel)  # (3, B, L, S)
        tissue = self._gather(self._tissue_flat, voxels, volume_index).long()  # (B, L, S)
        tissue = self._fill_gel(tissue, coupling)
        impedance, alpha, echogenicity = self._tissue_table[:, tissue]  # each (B, L, S)

        transmitted_before, transmitted_after, reflection = _transmission(
            impedance, coupling, self._face_impedance
        )
        f = self.preset.center_frequency_mhz
        step_db = alpha * (f * self.sample_spacing_mm / 10.0)
        loss_db = torch.cumsum(step_db, dim=-1) - step_db  # (B, L, S) one way, above each sample
        round_trip = torch.pow(10.0, -loss_db.clamp(max=_FLOOR_DB) / 10.0)  # 10^(-2 loss / 20)

        real = reflection * transmitted_before * round_trip
        imag = torch.zeros_like(real)
        if self._speckle_tiles:
            scatter = BACKSCATTER_AMPLITUDE * echogenicity * transmitted_after * round_trip
            field = self._scatterer_field(pose, volume_index)  # (B, 2, L, S)
            real = real + scatter * field[:, 0]
            imag = scatter * field[:, 1]
        iq = self._convolve_psf(torch.stack([real, imag], dim=1))  # (B, 2, L, S)
        envelope = torch.hypot(iq[:, 0], iq[:, 1]) * self._tgc_gain

        s = self.settings
        brightness_db = 20.0 * torch.log10(envelope.clamp_min(1e-12)) + s.gain_db
        brightness = ((brightness_db + s.dynamic_range_db) / s.dynamic_range_db).clamp(0.0, 1.0)
        excess_db = (loss_db - self._nominal_loss_db).clamp(max=_FLOOR_DB)
        line_confidence = (transmitted_after * torch.pow(10.0, -excess_db / 10.0)).clamp(0.0, 1.0)

        lines = torch.stack([brightness, line_confidence], dim=1)  # (B, 2, L, S)
        grid = self._scan_grid.expand(batch, -1, -1, -1)
        pixels = F.grid_sample(lines, grid, mode="bilinear", align_corners=True)
        pixels = pixels * self.sector_mask
        image = torch.round(pixels[:, 0] * 255.0).to(torch.uint8)

        target_mask = plane_area = None
        if target_ids is not None:
            target_mask, plane_area = self._target(probe_to_voxel, volume_index, target_ids)
        return BModeFrame(
            image,
            pixels[:, 1],
            target_mask,
            plane_area,
            envelope,
            line_confidence,
            self.sector_mask,
            self.pixel_size_mm,
        )

    def _check_volume_index(self, volume_index, batch: int) -> torch.Tensor:
        if volume_index is None:
            if self.n_volumes == 1:
                return torch.zeros(batch, dtype=torch.long, device=self.device)
            if batch != self.n_volumes:
                raise ValueError(
                    f"{batch} poses for {self.n_volumes} volumes: pass volume_index (B,) "
                    "or one pose per volume"
                )
            return torch.arange(batch, device=self.device)
        index = torch.as_tensor(volume_index, device=self.device)
        if index.shape != (batch,) or index.dtype.is_floating_point:
            raise ValueError(f"volume_index must be ({batch},) integers, got {tuple(index.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= self.n_volumes:
            raise ValueError(f"volume_index must lie in [0, {self.n_volumes - 1}]")
        return index.long()

    def _check_coupling(self, coupling, batch: int) -> torch.Tensor:
        if coupling is None:
            return torch.ones(batch, self.n_lines, device=self.device)
        coupling = torch.as_tensor(coupling, device=self.device).to(torch.float32)
        if coupling.shape != (batch, self.n_lines):
            raise ValueError(
                f"coupling must have shape ({batch}, {self.n_lines}), got {tuple(coupling.shape)}"
            )
        if not torch.isfinite(coupling).all() or coupling.min() < 0 or coupling.max() > 1:
            raise ValueError("coupling must lie in [0, 1]")
        return coupling

    def _line_points(self, transform: torch.Tensor) -> torch.Tensor:
        """Every line sample mapped by ``transform`` (B, 4, 4), component-major ``(3, B, L, S)``."""
        origins = torch.baddbmm(
            transform[:, :3, 3:],
            transform[:, :3, :3],
            self._line_origins.expand(len(transform), 3, -1),
        )
        directions = transform[:, :3, :3] @ self._line_directions
        return torch.addcmul(
            origins.transpose(0, 1)[..., None],
            directions.transpose(0, 1)[..., None],
            self.sample_depths_mm,
        )

    def _gather(self, flat: torch.Tensor, voxels: torch.Tensor, volume_index) -> torch.Tensor:
        """Nearest-voxel values at padded voxel coordinates ``(3, B, ...)`` -> ``(B, ...)``.

        Coordinates carry the +0.5 of rounding, so ``floor`` gives the nearest voxel; points
        outside the grid are clamped onto the padding and read its value.
        """
        shape = (3,) + (1,) * (voxels.ndim - 1)
        ijk = torch.minimum(voxels.floor().clamp_min_(0.0), self._voxel_upper.view(shape))
        index = (ijk.double() * self._voxel_strides.view(shape)).sum(0).long()
        offset = (volume_index * self._volume_stride).view((-1,) + (1,) * (index.ndim - 1))
        return flat.take(index + offset)

    def _fill_gel(self, tissue: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
        """On coupled lines that reach tissue within the gel depth, the air before it is gel."""
        gel_samples = min(
            int(self.settings.coupling_gel_mm / self.sample_spacing_mm) + 1, self.n_samples
        )
        head = tissue[..., :gel_samples]
        leading_air = torch.cumprod((head == self._air_id).to(torch.uint8), dim=-1).bool()
        reaches_tissue = ~leading_air[..., -1:] & (coupling > 0)[..., None]
        tissue = tissue.clone()
        tissue[..., :gel_samples] = torch.where(leading_air & reaches_tissue, self._gel_id, head)
        return tissue

    def _scatterer_field(self, pose: torch.Tensor, volume_index: torch.Tensor) -> torch.Tensor:
        """Complex scatterer field at the samples' patient positions, ``(B, 2, L, S)``."""
        batch = pose.shape[0]
        patient = self._line_points(pose)  # (3, B, L, S)
        offsets = self._speckle_offsets_mm[volume_index].T[..., None, None]  # (3, B, 1, 1)
        voxels = ((patient + offsets) / self._speckle_voxel_mm).movedim(0, -1)  # (B, L, S, 3)
        field = 0.0
        for n, tile in self._speckle_tiles:
            grid = torch.remainder(voxels, n).mul_(2.0 / n).sub_(1.0)
            field = (
                field
                + F.grid_sample(
                    tile[None], grid.view(1, batch, -1, 1, 3), mode="bilinear", align_corners=True
                )[0, :, :, :, 0]
            )
        field = field / math.sqrt(len(self._speckle_tiles))  # (2, B, L*S)
        return field.transpose(0, 1).reshape(batch, 2, self.n_lines, self.n_samples)

    def _convolve_psf(self, iq: torch.Tensor) -> torch.Tensor:
        """Separable PSF on ``(B, 2, L, S)`` as sums of shifted copies (small kernels)."""
        if self._axial_kernel is None:
            return iq
        ra, rl = len(self._axial_kernel) // 2, len(self._lateral_kernel) // 2
        padded = F.pad(iq, (ra, ra, rl, rl), mode="replicate")
        axial = padded[..., : self.n_samples] * self._axial_kernel[0]
        for k, weight in enumerate(self._axial_kernel[1:], start=1):
            axial.add_(padded[..., k : k + self.n_samples], alpha=weight)
        out = axial[:, :, : self.n_lines] * self._lateral_kernel[0]
        for k, weight in enumerate(self._lateral_kernel[1:], start=1):
            out.add_(axial[:, :, k : k + self.n_lines], alpha=weight)
        return out

    def _target(self, probe_to_voxel, volume_index, target_ids):
        """Target mask in the image ``(B, H, W)`` and target area on the whole plane ``(B,)``."""
        if self._label_flat is None:
            raise ValueError("target_ids need a label volume: pass labels (or a Patient)")
        ids = torch.as_tensor(target_ids, device=self.device).reshape(-1)
        if ids.dtype.is_floating_point:
            raise ValueError(f"target_ids must be integers, got {ids.dtype}")
        voxels = torch.baddbmm(
            probe_to_voxel[:, :3, 3:],
            probe_to_voxel[:, :3, :3],
            self._target_points.expand(len(probe_to_voxel), 3, -1),
        ).transpose(0, 1)  # (3, B, N)
        labels = self._gather(self._label_flat, voxels, volume_index)
        hit = torch.isin(labels, ids.to(labels.dtype))
        n_sector = self._n_sector
        height, width = self.sector_mask.shape
        mask = hit.new_zeros(hit.shape[0], height * width)
        mask[:, self._sector_pixels] = hit[:, :n_sector]
        mask = mask.view(-1, height, width)
        plane_area = hit[:, n_sector:].sum(-1).to(torch.float32) * self._plane_cell_mm2
        return mask, plane_area


def _transmission(impedance: torch.Tensor, coupling: torch.Tensor, face_impedance: float):
    """Interface reflection r and the one-way intensity transmission above / below each sample.

    Args:
        impedance: ``(B, L, S)`` impedance per sample.
        coupling: ``(B, L)`` fraction of each line's intensity entering the tissue.
        face_impedance: Impedance in front of the first sample (the probe's matched lens).

    Returns:
        ``(transmitted_before, transmitted_after, r)``, each ``(B, L, S)``.
    """
    face = torch.full_like(impedance[..., :1], face_impedance)
    above = torch.cat([face, impedance[..., :-1]], dim=-1)
    reflection = (impedance - above) / (impedance + above)
    passed = torch.cumprod(1.0 - reflection * reflection, dim=-1).clamp_min(_FLOOR)
    passed = passed * coupling[..., None]
    before = torch.cat([coupling[..., None], passed[..., :-1]], dim=-1)
    return before, passed, reflection


def _pad_flat(volumes: torch.Tensor, value: int) -> torch.Tensor:
    """``(V, I, J, K)`` volumes padded by one voxel of ``value`` on every side, flattened."""
    padded = volumes.new_full([volumes.shape[0]] + [n + 2 for n in volumes.shape[1:]], value)
    padded[:, 1:-1, 1:-1, 1:-1] = volumes
    return padded.reshape(-1)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)


@functools.lru_cache(maxsize=8)
def _smooth_periodic_noise(n: int, sigma_voxels: float, seed: int) -> torch.Tensor:
    """Complex Gaussian noise on a periodic n^3 grid, smoothed, ``(2, n+1, n+1, n+1)``.

    Real and imaginary parts each have variance 1/2; the extra last plane on every
    axis repeats the first, so trilinear sampling of ``[0, n]`` wraps seamlessly. Cached:
    simulators with the same seed share the (read-only) volumes.
    """
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((2, n, n, n), generator=generator, dtype=torch.float32)
    k = torch.fft.fftfreq(n, dtype=torch.float32) * (2.0 * math.pi)
    k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
    smooth = torch.fft.ifftn(
        torch.fft.fftn(noise, dim=(1, 2, 3)) * torch.exp(-0.5 * sigma_voxels**2 * k2), dim=(1, 2, 3)
    ).real
    smooth = smooth / (smooth.std(dim=(1, 2, 3), keepdim=True) * math.sqrt(2.0))
    smooth = torch.cat([smooth, smooth[:, :1]], dim=1)
    smooth = torch.cat([smooth, smooth[:, :, :1]], dim=2)
    smooth = torch.cat([smooth, smooth[:, :, :, :1]], dim=3)
    return smooth.to(torch.float32).contiguous()


def _unpack_volume(volume, affine, labels, device):
    """Tissue ids, labels, affine and device from a Patient, Patients, or arrays."""
    if hasattr(volume, "tissue_map"):
        volume = [volume]
    if isinstance(volume, Sequence) and volume and hasattr(volume[0], "tissue_map"):
        shapes = {tuple(p.tissue_map.shape) for p in volume}
        if len(shapes) != 1:
            raise ValueError(f"patients must share one grid shape, got {sorted(shapes)}")
        tissue_ids = torch.as_tensor(np.stack([p.tissue_map for p in volume]))
        labels = torch.as_tensor(np.stack([p.labels for p in volume]))
        affine = np.stack([p.affine for p in volume])
        return tissue_ids, labels, affine, device or "cpu"
    if affine is None:
        raise ValueError("affine (voxel -> patient mm) is required with a raw tissue volume")
    tissue_ids = torch.as_tensor(volume)
    device = device or (tissue_ids.device if isinstance(volume, torch.Tensor) else "cpu")
    return tissue_ids, labels, affine, device

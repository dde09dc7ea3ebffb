"""Digitally reconstructed radiographs: line integrals through voxel volumes and X-ray images.

Line integrals follow Joseph's method (P. M. Joseph, "An improved algorithm for reprojecting
rays through pixel images", IEEE TMI 1(3), 1982): each ray is sampled once per voxel plane
across its dominant axis (the voxel axis it advances fastest along), where the trilinear
interpolant reduces to a bilinear one in the plane. The planes of the volume are stacked as a
batch of 2-D images, so one ``torch.nn.functional.grid_sample`` call samples every ray of
every batch item in a block of planes. Each sample is weighted by the length of the ray's
segment in its plane's slab, clipped to the part of the segment from the source to the
detector pixel that lies inside the volume's box (voxel edges; a voxel fills its cell). The
result is the integral of the volume's trilinear interpolant along the ray, up to the
in-slab variation that Joseph's method neglects. Optionally (``slab_voxels``, ``slab_mm``)
a ray samples the average of a few planes at a time across its dominant axis: fewer
samples, the same resolution across the beam.

:class:`XRaySensor` turns a CT (Hounsfield units) into per-material density volumes once, keeps
them on the device, and renders batches of polychromatic, optionally noisy radiographs.

Limitations: rays sample pixel centres (no detector-area integration, no focal-spot blur);
rays between two dominant axes (45 degrees to both) step 1 voxel along each (Joseph's usual
sampling); a downsampled volume (``max_voxel_mm``) trades detail for speed; volumes are not
checked for NaN (a NaN voxel spoils the rays that cross it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sonoray.assets import tissues
from sonoray.sensors import dose, xray_physics
from sonoray.sensors.xray_geometry import XRayGeometry

#: Elements (planes x rays x channels) sampled per grid_sample call, by device type: small
#: blocks stay in CPU caches, large ones keep a GPU busy; both bound working memory.
SAMPLES_PER_BLOCK = {"cpu": 1 << 20, "cuda": 1 << 26}

#: Least planes per grid_sample call per thread (its CPU kernel runs planes in parallel).
PLANES_PER_THREAD = 2

#: |det| of the affine's 3 x 3 part below which it counts as singular (mm^3 per voxel).
MIN_VOXEL_VOLUME_MM3 = 1e-9

#: Largest in-plane drift (voxels) of a ray across one slab for slab sampling to be used.
MAX_SLAB_DRIFT_VOXELS = 2.0

#: Density x mm -> g/cm^2.
MM_TO_CM = 0.1

#: Label projectors (one per structure list) kept per sensor.
LABEL_PROJECTOR_CACHE = 4


def _as_affines(affine, count: int, device) -> torch.Tensor:
    """Validate one 4 x 4 or ``count`` stacked voxel -> patient affines; return (count, 4, 4)."""
    a = torch.as_tensor(
        np.asarray(affine, dtype=np.float64)
        if not isinstance(affine, torch.Tensor)
        else affine.detach().cpu().double()
    )
    if a.shape == (4, 4):
        a = a.expand(count, 4, 4)
    if a.ndim != 3 or a.shape[1:] != (4, 4) or a.shape[0] != count:
        raise ValueError(f"affine must be (4, 4) or ({count}, 4, 4), got {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("affine must be finite")
    bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=a.dtype)
    if not torch.allclose(a[:, 3], bottom.expand(count, 4)):
        raise ValueError(f"affine's last row must be [0, 0, 0, 1], got {a[:, 3].tolist()}")
    det = torch.linalg.det(a[:, :3, :3])
    if (det.abs() < MIN_VOXEL_VOLUME_MM3).any():
        raise ValueError(f"affine is singular (det of its 3 x 3 part {det.tolist()})")
    return a.to(device)


class VolumeProjector:
    """Line integrals through volumes of one grid, with the per-axis plane stacks cached.

    Args:
        volume: (C, I, J, K) one volume, or (P, C, I, J, K) P volumes of one grid, indexed
            ``[i, j, k]`` like ``Patient`` arrays; any per-voxel quantity, one per channel.
        affine: 4 x 4 voxel -> patient mm, or (P, 4, 4) one per volume.

        slab_voxels: Planes averaged into one plane of the stack across each axis (1: exact
            Joseph sampling). Rays cross a stack's planes nearly head-on, so averaging along
            that axis alone keeps the detector's resolution while cutting the samples: the
            error is second order in the ray's in-plane drift across a slab (its first-order
            part cancels about the slab's centre) plus the tilt of structures within it. An
            exposure whose rays drift more than ``MAX_SLAB_DRIFT_VOXELS`` across a slab
            (oblique beams) is sampled plane by plane instead.

    Memory: each axis used keeps a copy of the volume(s) as a stack of planes.
    """

    def __init__(
        self, volume: torch.Tensor, affine, slab_voxels: Sequence[int] = (1, 1, 1)
    ) -> None:
        slab = tuple(int(t) for t in slab_voxels)
        if (
            len(slab) != 3
            or min(slab) < 1
            or any(t != v for t, v in zip(slab, slab_voxels, strict=True))
        ):
            raise ValueError(f"slab_voxels must be three integers >= 1, got {slab_voxels}")
        self.slab_voxels = slab
        vol = torch.as_tensor(volume)
        if vol.ndim == 4:
            vol = vol.unsqueeze(0)
        if vol.ndim != 5 or min(vol.shape) < 1:
            raise ValueError(
                f"volume must be (C, I, J, K) or (P, C, I, J, K), got {tuple(vol.shape)}"
            )
        self.volume = vol.float().contiguous()  # (P, C, I, J, K)
        affine64 = _as_affines(affine, vol.shape[0], vol.device)
        self.affine = affine64.float()
        self.inverse_affine = torch.linalg.inv(affine64).float()
        self._stacks: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape[2:])  # type: ignore[return-value]

    @property
    def num_volumes(self) -> int:
        return self.volume.shape[0]

    @property
    def channels(self) -> int:
        return self.volume.shape[1]

    def plane_axes(self, axis: int) -> tuple[int, int]:
        """The in-plane voxel axes ``(b, c)`` of the planes across ``axis``: rows, columns.

        Images are shown head up, so the pixels of one image row lie across the patient's
        long axis. The voxel axis nearest the long axis (anterior-posterior for axial beams)
        becomes the planes' rows ``b`` and the other one their contiguous columns ``c``, so
        consecutive rays sample neighbouring memory. Only speed depends on this choice.
        """
        b, c = [a for a in range(3) if a != axis]
        direction = self.affine[0, :3, :3].abs()  # (3 patient axes, 3 voxel axes)
        long_axis = 1 if int(direction[2].argmax()) == axis else 2  # A-P for axial beams
        if int(direction[long_axis].argmax()) == c:
            b, c = c, b
        return b, c

    def plane_stack(self, axis: int, thick: int = 1) -> torch.Tensor:
        """Volumes as 2-D planes across ``axis``: (N_slabs, C, n_b, P * (n_c + 2)).

        Each plane averages ``thick`` voxel planes (the last one those left).
        ``(b, c)`` are :meth:`plane_axes`; the volumes sit side by side along ``c``, each with
        one replicated column on both sides so bilinear sampling never mixes two volumes and
        the half voxel at the box's edge takes the edge voxel's value.
        """
        if (axis, thick) not in self._stacks:
            p, c = self.num_volumes, self.channels
            b_ax, c_ax = self.plane_axes(axis)
            v = self.volume.permute(2 + axis, 0, 1, 2 + b_ax, 2 + c_ax)  # (N_a, P, C, n_b, n_c)
            v = _average_planes(v, thick)
            v = torch.cat([v[..., :1], v, v[..., -1:]], dim=-1)
            n_a, n_b, n_c2 = v.shape[0], v.shape[3], v.shape[4]
            v = v.permute(0, 2, 3, 1, 4).reshape(n_a, c, n_b, p * n_c2)
            self._stacks[(axis, thick)] = v.contiguous()
        return self._stacks[(axis, thick)]

    def line_integrals(self, geometry: XRayGeometry, volume_index=None) -> torch.Tensor:
        """Integrals of each channel along every pixel's ray (quantity x mm).

        Args:
            geometry: B exposures.
            volume_index: (B,) which volume each exposure sees; None means volume 0 when
                there is one volume, else one volume per exposure (P must equal B).

        Returns:
            (B, C, rows, cols), on the volumes' device.
        """
        if not isinstance(geometry, XRayGeometry):
            raise TypeError(f"geometry must be an XRayGeometry, got {type(geometry).__name__}")
        dev = self.volume.device
        geometry = geometry.to(dev)
        b, rows, cols = geometry.batch_size, geometry.rows, geometry.cols
        index = self._volume_index(volume_index, b)
        rays = _Rays.through(geometry, self.inverse_affine[index], self.grid_shape, index)

        # Slabs only for exposures whose rays drift little across one (decided per exposure,
        # so that a batch renders each item as it would alone).
        thick = torch.tensor(self.slab_voxels, device=dev)[rays.axis]  # (R,)
        if (thick > 1).any():
            drift = (rays.drift * thick).view(b, -1, 1)
            axes = rays.axis.view(b, -1, 1) == torch.arange(3, device=dev)  # (B, n, 3)
            worst = torch.where(axes, drift, torch.zeros_like(drift)).amax(1)  # (B, 3)
            too_oblique = worst > MAX_SLAB_DRIFT_VOXELS
            exact = too_oblique.gather(1, rays.axis.view(b, -1)).reshape(-1)
            thick = torch.where(exact, torch.ones_like(thick), thick)

        out = torch.zeros(self.channels, b * rows * cols, device=dev)
        groups = torch.unique(rays.axis * 1000 + thick).tolist()
        for key in groups:
            axis, t = divmod(int(key), 1000)
            chosen = (rays.axis == axis) & (thick == t)
            count = int(chosen.sum())
            subset = None if count == rays.axis.numel() else chosen.nonzero().squeeze(1)
            out_axis = self._integrate_axis(rays, axis, subset, t)
            if subset is None:
                out = out_axis
            else:
                out[:, subset] = out_axis
        return out.view(self.channels, b, rows, cols).transpose(0, 1)

    def _volume_index(self, volume_index, batch: int) -> torch.Tensor:
        dev = self.volume.device
        if volume_index is None:
            if self.num_volumes not in (1, batch):
                raise ValueError(
                    f"{self.num_volumes} volumes for {batch} exposures: pass volume_index"
                )
            if self.num_volumes == 1:
                return torch.zeros(batch, dtype=torch.long, device=dev)
            return torch.arange(batch, device=dev)
        idx = torch.as_tensor(volume_index, device=dev).long().reshape(-1)
        if idx.numel() != batch or (idx < 0).any() or (idx >= self.num_volumes).any():
            raise ValueError(
                f"volume_index must hold {batch} indices in [0, {self.num_volumes}), "
                f"got {idx.tolist()}"
            )
        return idx

    def _integrate_axis(self, rays: _Rays, axis: int, subset, thick: int) -> torch.Tensor:
        """(C, R) integrals of the rays (all, or ``subset``) whose dominant axis is ``axis``."""
        stack = self.plane_stack(axis, thick)
        n_planes, _, n_b, width = stack.shape
        b_ax, c_ax = self.plane_axes(axis)
        n_c = self.grid_shape[c_ax]

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if subset is None else t[subset]

        s, d = pick(rays.start), pick(rays.delta)  # (R, 3) voxel index space
        d_a = d[:, axis]
        # Along the ray, x_b(q) = alpha_b + beta_b * q at plane q of the dominant axis.
        beta = d / d_a[:, None]
        alpha = s - s[:, axis : axis + 1] * beta
        q0 = s[:, axis] + pick(rays.t_enter) * d_a
        q1 = s[:, axis] + pick(rays.t_exit) * d_a
        empty = pick(rays.t_exit) <= pick(rays.t_enter)
        lo = torch.minimum(q0, q1)
        hi = torch.where(empty, lo, torch.maximum(q0, q1))
        # Slabs of ``thick`` planes: slab index q' = (q - centre) / thick.
        centre = (thick - 1) / 2
        lo, hi = (lo - centre) / thick, (hi - centre) / thick
        mm_per_plane = pick(rays.length_mm) / d_a.abs() * thick

        # Normalised grid coordinates (align_corners=True), linear in the slab index: y along
        # axis b, x along axis c shifted to the ray's volume block (1 + v * (n_c + 2) columns).
        # With one plane per slab no clamp is needed (|beta| <= 1 on the dominant axis, so a
        # sample half a plane outside the clipped segment is at most one voxel outside the box,
        # on the replicated column); thicker slabs clamp x to the volume's block.
        y_scale, x_scale = 2.0 / max(n_b - 1, 1), 2.0 / (width - 1)
        offset = 1.0 + pick(rays.volume).to(s.dtype) * (n_c + 2)
        x0 = alpha[:, c_ax] + beta[:, c_ax] * centre
        y0 = alpha[:, b_ax] + beta[:, b_ax] * centre
        start = torch.stack([(x0 + offset) * x_scale - 1.0, y0 * y_scale - 1.0], dim=-1)  # (R, 2)
        slope = torch.stack([beta[:, c_ax], beta[:, b_ax]], dim=-1) * thick
        slope *= torch.tensor([x_scale, y_scale], device=s.device, dtype=s.dtype)
        x_min = (offset - 0.5) * x_scale - 1.0
        x_max = (offset + n_c - 0.5) * x_scale - 1.0

        first = max(0, int(torch.floor(lo.min() + 0.5)))
        last = min(n_planes - 1, int(torch.ceil(hi.max() - 0.5)))
        n_rays = s.shape[0]
        acc = torch.zeros(self.channels, n_rays, device=s.device)
        if last < first:  # no ray of this group crosses the volume
            return acc
        block = max(
            PLANES_PER_THREAD * torch.get_num_threads(),
            SAMPLES_PER_BLOCK.get(s.device.type, 1 << 20) // (n_rays * max(self.channels, 2)),
        )
        block = min(block, last - first + 1)
        grid = torch.empty(block, n_rays, 2, device=s.device)
        weight = torch.empty(block, n_rays, device=s.device)
        for q_start in range(first, last + 1, block):
            q_end = min(q_start + block, last + 1)
            n_q = q_end - q_start
            q = torch.arange(q_start, q_end, device=s.device, dtype=s.dtype)[:, None]  # (Q, 1)
            g, w = grid[:n_q], weight[:n_q]
            torch.addcmul(start, slope, q[:, :, None], out=g)
            if thick > 1:
                torch.clamp(g[..., 0], x_min, x_max, out=g[..., 0])
            values = F.grid_sample(
                stack[q_start:q_end],
                g.unsqueeze(1),
                mode="bilinear",
                padding_mode="border",
                align_corners=True,
            )  # (Q, C, 1, R)
            # Length of the ray's clipped segment inside each slab [q - 1/2, q + 1/2].
            torch.minimum(q + 0.5, hi, out=w)
            w.sub_(torch.maximum(q - 0.5, lo)).clamp_(0.0, 1.0)
            acc += values.squeeze(2).mul_(w.unsqueeze(1)).sum(0)
        return acc * mm_per_plane


def _average_planes(v: torch.Tensor, thick: int) -> torch.Tensor:
    """Average groups of ``thick`` planes along dim 0 (the last group: the planes left)."""
    if thick == 1:
        return v
    n = v.shape[0]
    slabs = -(-n // thick)
    padded = torch.cat([v, v.new_zeros((slabs * thick - n, *v.shape[1:]))])
    sums = padded.view(slabs, thick, *v.shape[1:]).sum(1)
    counts = (n - thick * torch.arange(slabs, device=v.device)).clamp(max=thick)
    return sums / counts.to(v.dtype).view(-1, *[1] * (v.ndim - 1))


@dataclass
class _Rays:
    """Rays of B exposures, flattened to B x rows x cols, in voxel index space."""

    start: torch.Tensor  # (R, 3) source
    delta: torch.Tensor  # (R, 3) pixel centre - source
    length_mm: torch.Tensor  # (R,) source to pixel centre
    t_enter: torch.Tensor  # (R,) ray parameter where the clipped segment starts, in [0, 1]
    t_exit: torch.Tensor  # (R,) ... and ends (<= t_enter: the ray misses the volume)
    axis: torch.Tensor  # (R,) dominant voxel axis
    drift: torch.Tensor  # (R,) largest in-plane voxel step per plane of the dominant axis
    volume: torch.Tensor  # (R,) volume index

    @classmethod
    def through(
        cls,
        geometry: XRayGeometry,
        inverse_affine: torch.Tensor,
        grid_shape: tuple[int, int, int],
        volume_index: torch.Tensor,
    ) -> _Rays:
        b = geometry.batch_size
        pixels_mm = geometry.pixel_centres_mm().reshape(b, -1, 3)  # (B, P, 3)
        n = pixels_mm.shape[1]
        source_mm = geometry.source_mm
        lin, shift = inverse_affine[:, :3, :3], inverse_affine[:, :3, 3]
        start = torch.einsum("bij,bj->bi", lin, source_mm) + shift  # (B, 3)
        end = torch.einsum("bij,bpj->bpi", lin, pixels_mm) + shift[:, None]  # (B, P, 3)
        delta = end - start[:, None]
        length_mm = (pixels_mm - source_mm[:, None]).norm(dim=-1)

        # Slab clipping against the box of voxel edges [-1/2, n - 1/2] per axis.
        lo = torch.full((3,), -0.5, device=delta.device)
        hi = torch.tensor(grid_shape, device=delta.device, dtype=delta.dtype) - 0.5
        s = start[:, None].expand_as(delta)
        parallel = delta == 0
        safe = torch.where(parallel, torch.ones_like(delta), delta)
        t_lo, t_hi = (lo - s) / safe, (hi - s) / safe
        inside = (s >= lo) & (s <= hi)
        inf = torch.full_like(delta, float("inf"))
        t_near = torch.where(parallel, torch.where(inside, -inf, inf), torch.minimum(t_lo, t_hi))
        t_far = torch.where(parallel, torch.where(inside, inf, -inf), torch.maximum(t_lo, t_hi))
        t_enter = t_near.amax(-1).clamp(min=0.0)
        t_exit = t_far.amin(-1).clamp(max=1.0)

        steps = delta.abs()
        longest, axis = steps.max(-1)
        # Largest step along the other two axes per plane: the second largest component.
        drift = (steps.sum(-1) - longest - steps.min(-1).values) / longest
        return cls(
            start=s.reshape(-1, 3),
            delta=delta.reshape(-1, 3),
            length_mm=length_mm.reshape(-1),
            t_enter=t_enter.reshape(-1),
            t_exit=t_exit.reshape(-1),
            axis=axis.reshape(-1),
            drift=drift.reshape(-1),
            volume=volume_index[:, None].expand(b, n).reshape(-1),
        )


def line_integrals(
    volume: torch.Tensor, affine, geometry: XRayGeometry, volume_index=None
) -> torch.Tensor:
    """Integrals of a volume's channels along every pixel's ray, source to detector.

    Only the part of each ray between the source and the pixel centre that lies inside the
    volume's box counts; a source or detector inside the volume integrates only between them.
    The volume is sampled by trilinear interpolation (Joseph's method, see module docstring).

    Args:
        volume: (C, I, J, K) shared by the batch, or (B, C, I, J, K) one per exposure (or
            (P, C, I, J, K) with ``volume_index``); indexed ``[i, j, k]`` like ``Patient``
            arrays; any per-voxel quantity (density, attenuation, label masks ...).
        affine: 4 x 4 voxel -> patient mm (or (P, 4, 4)).
        geometry: B exposures.
        volume_index: Optional (B,) volume of each exposure.

    Returns:
        (B, C, rows, cols) integrals in (quantity x mm), on the volume's device.

    For repeated calls on one volume, keep a :class:`VolumeProjector` (it caches the plane
    stacks this function rebuilds every call).
    """
    return VolumeProjector(volume, affine).line_integrals(geometry, volume_index)


def material_densities(hu) -> np.ndarray:
    """Density (g/cm^3) of each X-ray material per voxel, from CT numbers.

    Materials and density come from ``sonoray.assets.tissues`` (``xray_material_from_hu``,
    ``density_from_hu``: DeepDRR's thresholds and two-segment fit); padding values below
    -1024 HU get density 0.

    Args:
        hu: (..., I, J, K) Hounsfield units.

    Returns:
        (..., M, I, J, K) float32, M = ``len(XRAY_MATERIALS)``; each voxel's density sits in
        its material's channel, the others are 0.
    """
    hu = np.asarray(hu, dtype=np.float32)
    rho = tissues.density_from_hu(hu).astype(np.float32)
    material = tissues.xray_material_from_hu(hu)
    return np.stack(
        [np.where(material == m, rho, np.float32(0.0)) for m in range(len(tissues.XRAY_MATERIALS))],
        axis=-4,
    )


def downsample(
    volume: torch.Tensor,
    affine: torch.Tensor,
    factors: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ``factors`` voxels per axis into one (mass-conserving; zero-padded at the end).

    Args:
        volume: (P, C, I, J, K).
        affine: (P, 4, 4) voxel -> patient mm.
        factors: Integer factor per voxel axis.

    Returns:
        The coarser volume and its affine (new voxel centres at the blocks' centres).
    """
    f = [int(x) for x in factors]
    if f == [1, 1, 1]:
        return volume, affine
    pad = [(-n) % k for n, k in zip(volume.shape[2:], f, strict=True)]
    vol = F.pad(volume, (0, pad[2], 0, pad[1], 0, pad[0]))
    vol = F.avg_pool3d(vol, kernel_size=f, stride=f)
    scale = torch.eye(4, dtype=affine.dtype, device=affine.device)
    scale[:3, :3] = torch.diag(torch.tensor(f, dtype=affine.dtype, device=affine.device))
    scale[:3, 3] = (torch.tensor(f, dtype=affine.dtype, device=affine.device) - 1) / 2
    return vol, affine @ scale


@dataclass
class XRayImage:
    """B rendered radiographs and their by-products.

    Attributes:
        image: (B, 1, H, W) uint8, bone bright, fixed window; unexposed pixels are 255.
        attenuation: (B, 1, H, W) -ln(I / I0) after flat-field (gain) normalisation.
        transmission: (B, 1, H, W) I / I0 (0 where no photon arrives).
        detector_kerma_ugy: (B, 1, H, W) expected primary air kerma at the detector (uGy).
        exposed: (B, 1, H, W) bool, pixels inside the collimated field.
        material_path_g_cm2: (B, M, H, W) path of each X-ray material along each ray.
        dap_mgy_cm2: (B,) dose-area product of each exposure.
    """

    image: torch.Tensor
    attenuation: torch.Tensor
    transmission: torch.Tensor
    detector_kerma_ugy: torch.Tensor
    exposed: torch.Tensor
    material_path_g_cm2: torch.Tensor
    dap_mgy_cm2: torch.Tensor


class XRaySensor:
    """Radiographs of one patient, or of P patients of one grid, from batches of geometries.

    Per-material density volumes (air, soft tissue, bone) are computed once from HU at
    construction and stay on ``device``; every call renders B exposures in one batch.

    Args:
        hu: (I, J, K) Hounsfield units, or (P, I, J, K) P patients of one grid.
        affine: 4 x 4 voxel -> patient mm (RAS), or (P, 4, 4).
        labels: Optional int label volume(s) of the same shape, for :meth:`project_labels`.
        label_names: Label id -> structure name, or one such dict per patient.
        device: Torch device of the volumes (and of every output).
        max_voxel_mm: If given, average voxels along each axis whose spacing is at most half
            of it (e.g. 1.5 turns 0.7 x 0.7 x 2.5 mm into 1.4 x 1.4 x 2.5 mm): faster, and
            accurate while voxels stay smaller than the pixels' footprint in the patient.
        slab_mm: If given, each ray samples slabs about this thick across its dominant axis
            (``VolumeProjector``'s ``slab_voxels``) instead of single voxel planes, keeping the
            full resolution across the beam: e.g. 3.0 averages 4 planes of 0.7 mm. For beams
            near a voxel axis (AP, PA, lateral views); an exposure whose rays drift more than
            ``MAX_SLAB_DRIFT_VOXELS`` across a slab (with 4-plane slabs, beyond about 25
            degrees off the axis) is sampled plane by plane, exactly, at the usual cost.
        structure_ids: Optional ``name -> label ids`` resolver per patient (e.g.
            ``Patient.structure_ids``), so that groups like ``"lungs"`` resolve.
    """

    def __init__(
        self,
        hu,
        affine,
        *,
        labels=None,
        label_names=None,
        device=None,
        max_voxel_mm: float | None = None,
        slab_mm: float | None = None,
        structure_ids=None,
    ) -> None:
        hu = np.asarray(hu, dtype=np.float32)
        if hu.ndim == 3:
            hu = hu[None]
        if hu.ndim != 4:
            raise ValueError(f"hu must be (I, J, K) or (P, I, J, K), got shape {hu.shape}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        affines = _as_affines(affine, hu.shape[0], self.device).float()
        spacing = affines[0, :3, :3].norm(dim=0).cpu().numpy()
        if max_voxel_mm is None:
            self.factors = (1, 1, 1)
        elif not max_voxel_mm > 0:
            raise ValueError(f"max_voxel_mm must be > 0, got {max_voxel_mm}")
        else:
            self.factors = tuple(max(1, int(np.floor(max_voxel_mm / s + 1e-6))) for s in spacing)
        if slab_mm is not None and not slab_mm > 0:
            raise ValueError(f"slab_mm must be > 0, got {slab_mm}")
        coarse = spacing * np.array(self.factors)
        self.slab_voxels = (
            (1, 1, 1)
            if slab_mm is None
            else tuple(max(1, int(np.floor(slab_mm / s + 1e-6))) for s in coarse)
        )
        with torch.inference_mode():
            dens = torch.from_numpy(material_densities(hu)).to(self.device)
            dens, coarse_affine = downsample(dens, affines, self.factors)
            self.projector = VolumeProjector(dens, coarse_affine, self.slab_voxels)
        self._full_affine = affines
        self._labels = None if labels is None else np.asarray(labels).reshape(hu.shape)
        if isinstance(label_names, dict) or label_names is None:
            label_names = [label_names or {}] * hu.shape[0]
        self._label_names = list(label_names)
        self._structure_ids = structure_ids
        self._label_projectors: dict[tuple, VolumeProjector] = {}

    @classmethod
    def from_patients(
        cls,
        patients,
        *,
        device=None,
        max_voxel_mm: float | None = None,
        slab_mm: float | None = None,
    ) -> XRaySensor:
        """Sensor over one ``Patient`` or a list of patients sharing one grid shape."""
        if not isinstance(patients, (list, tuple)):
            patients = [patients]
        shapes = {p.hu.shape for p in patients}
        if len(shapes) != 1:
            raise ValueError(f"patients must share one grid shape to batch, got {sorted(shapes)}")
        return cls(
            np.stack([p.hu for p in patients]),
            np.stack([p.affine for p in patients]),
            labels=np.stack([p.labels for p in patients]),
            label_names=[p.label_names for p in patients],
            device=device,
            max_voxel_mm=max_voxel_mm,
            slab_mm=slab_mm,
            structure_ids=[p.structure_ids for p in patients],
        )

    @property
    def num_volumes(self) -> int:
        return self.projector.num_volumes

    @torch.inference_mode()
    def material_paths(self, geometry: XRayGeometry, volume_index=None) -> torch.Tensor:
        """(B, M, H, W) path (g/cm^2) of each X-ray material along every pixel's ray."""
        return self.projector.line_integrals(geometry, volume_index) * MM_TO_CM

    @torch.inference_mode()
    def render(
        self,
        geometry: XRayGeometry,
        *,
        kvp=80.0,
        mas=2.0,
        filtration_mm_al=None,
        monoenergetic_kev=None,
        noise_seeds=None,
        window: tuple[float, float] = xray_physics.DEFAULT_WINDOW,
        volume_index=None,
    ) -> XRayImage:
        """Render B radiographs.

        Args:
            geometry: B exposures.
            kvp: Tube voltage, scalar or (B,), 40-150 kVp.
            mas: Tube current-time product, scalar or (B,), >= 0.
            filtration_mm_al: Total Al filtration (mm), scalar or (B,); None: by kVp.
            monoenergetic_kev: Check mode: one photon energy, transmission exp(-mu L).
            noise_seeds: None for the expected (noise-free) image, else one int seed per
                exposure for Poisson quantum noise.
            window: Fixed display window on -ln(I / I0).
            volume_index: (B,) patient of each exposure when the sensor holds several.
        """
        b = geometry.batch_size
        kvp_b = xray_physics.per_item(xray_physics.check_kvp(kvp), b, "kvp")
        mas_b = xray_physics.per_item(dose.check_mas(mas), b, "mas")
        filt_b = (
            None
            if filtration_mm_al is None
            else xray_physics.per_item(filtration_mm_al, b, "filtration_mm_al")
        )
        mono_b = (
            None
            if monoenergetic_kev is None
            else xray_physics.per_item(monoenergetic_kev, b, "monoenergetic_kev")
        )
        beam = xray_physics.beam(kvp_b, filt_b, mono_b)
        geometry = geometry.to(self.device)
        paths = self.material_paths(geometry, volume_index)  # (B, M, H, W)

        # Primary photon fluence at each pixel: tube output, inverse square, collimation.
        like = {"dtype": paths.dtype, "device": self.device}
        output = dose.tube_output_ugy_per_mas(kvp_b, filt_b) * mas_b  # uGy at 1 m
        fluence_1m = torch.as_tensor(output / beam.kerma_per_photon_ugy_mm2, **like)  # (B,)
        ray = geometry.pixel_centres_mm() - geometry.source_mm[:, None, None]  # (B, H, W, 3)
        dist = ray.norm(dim=-1)
        exposed = geometry.field_mask()
        fluence = fluence_1m[:, None, None] * (dose.REFERENCE_DISTANCE_MM / dist) ** 2 * exposed
        cos_in = (ray * geometry.normal[:, None, None]).sum(-1).abs() / dist
        area = geometry.pixel_mm.prod(-1)[:, None, None] * cos_in  # photons meet a tilted pixel

        sums = xray_physics.detector_response(paths, fluence, beam)
        signal, variance = sums[:, 0] * area, sums[:, 1] * area
        mean_energy = torch.as_tensor((beam.photons * beam.energy_kev).sum(-1), **like)
        flat = fluence * area * mean_energy[:, None, None]
        if noise_seeds is not None:
            signal = xray_physics.poisson_compound(signal, variance, noise_seeds)
        transmission = torch.where(flat > 0, signal / flat.clamp(min=1e-30), 0.0)
        attenuation = xray_physics.attenuation_from_transmission(transmission)
        return XRayImage(
            image=xray_physics.window_to_uint8(attenuation, window)[:, None],
            attenuation=attenuation[:, None],
            transmission=transmission[:, None],
            detector_kerma_ugy=sums[:, 2:3],
            exposed=exposed[:, None],
            material_path_g_cm2=paths,
            dap_mgy_cm2=dose.exposure_dap_mgy_cm2(geometry, kvp_b, mas_b, filt_b),
        )

    @torch.inference_mode()
    def project_labels(
        self, geometry: XRayGeometry, structures: Sequence, volume_index=None
    ) -> torch.Tensor:
        """Footprint of structures on the detector: path length (mm) of each ray inside them.

        Args:
            geometry: B exposures.
            structures: S structures, each a name (a structure or group, resolved per
                patient), a label id or a list of label ids.
            volume_index: (B,) patient of each exposure when the sensor holds several.

        Returns:
            (B, S, H, W) path length in mm; > 0 where the ray crosses the structure.
        """
        if self._labels is None:
            raise ValueError("this sensor has no label volume; pass labels= to project labels")
        key = tuple(s if isinstance(s, (str, int)) else tuple(s) for s in structures)
        if key not in self._label_projectors:
            masks = np.stack(
                [
                    np.stack([np.isin(lab, self._label_ids(s, p)) for s in key]).astype(np.float32)
                    for p, lab in enumerate(self._labels)
                ]
            )  # (P, S, I, J, K)
            vol, aff = downsample(
                torch.from_numpy(masks).to(self.device), self._full_affine, self.factors
            )
            if len(self._label_projectors) >= LABEL_PROJECTOR_CACHE:
                self._label_projectors.pop(next(iter(self._label_projectors)))
            self._label_projectors[key] = VolumeProjector(vol, aff, self.slab_voxels)
        return self._label_projectors[key].line_integrals(geometry.to(self.device), volume_index)

    def _label_ids(self, structure, patient: int) -> list[int]:
        if isinstance(structure, int):
            return [structure]
        if not isinstance(structure, str):
            return [int(i) for i in structure]
        if self._structure_ids is not None:
            return self._structure_ids[patient](structure)
        by_name = {n: i for i, n in self._label_names[patient].items()}
        if structure not in by_name:
            raise KeyError(
                f"no structure {structure!r} in volume {patient}; known: {sorted(by_name)}"
            )
        return [by_name[structure]]

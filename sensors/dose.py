"""Tube output and dose-area product (DAP) of an X-ray exposure.

Tube output (air kerma per mAs at 1 m) comes from the Kramers spectrum of
:mod:`sonoray.sensors.xray_physics` weighted by the energy absorption of air, scaled to one
calibration point: ``TUBE_OUTPUT_UGY_PER_MAS_AT_1M`` at 80 kVp with the default filtration.
The model then gives about 28 uGy/mAs at 60 kVp and 108 uGy/mAs at 120 kVp, the range that
FACTS.md quotes for diagnostic tubes (about 30-100 uGy/mAs, 60-120 kVp), and a first
half-value layer of 3.0 mm Al at 80 kVp (the minimum allowed for new tubes is 2.9 mm Al, US
21 CFR 1020.30); more filtration lowers the output as the spectrum predicts.

DAP = air kerma x irradiated area in any plane across the beam. Air kerma falls with the
inverse square of the distance and the area grows with its square, so DAP does not depend on
the plane (ICRU Report 74 (2005), section 4; FACTS.md):

    DAP (mGy cm^2) = K_1m (uGy/mAs) x mAs x (1000 mm / d)^2 x A(d) (cm^2) / 1000

Limitations: the calibration point is a typical value, not a measured tube (real outputs vary
by about +-30 % with anode, ripple and age); no backscatter, no attenuation in air; the field is
the collimated rectangle given by the geometry.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from sonoray.sensors import xray_physics
from sonoray.sensors.xray_geometry import XRayGeometry

SOURCES = {
    "output": "Typical diagnostic tube output, about 50 uGy/mAs at 1 m and 80 kVp (approx.); "
    "FACTS.md quotes 30-100 uGy/mAs for 60-120 kVp",
    "ICRU74": "ICRU Report 74 (2005): patient dosimetry for X rays used in medical imaging",
}

#: Calibration: air kerma per mAs at 1 m (uGy/mAs) at ``CALIBRATION_KVP`` [output].
TUBE_OUTPUT_UGY_PER_MAS_AT_1M = 50.0
CALIBRATION_KVP = 80.0

#: Reference distance of the tube output (mm).
REFERENCE_DISTANCE_MM = 1000.0


def check_mas(mas) -> np.ndarray:
    """Validate tube current-time products; return them as a float64 array."""
    m = np.atleast_1d(np.asarray(mas, dtype=np.float64))
    if not np.isfinite(m).all() or (m < 0).any():
        raise ValueError(f"mAs must be finite and >= 0, got {m.tolist()}")
    return m


def _relative_output(kvp, filtration_mm_al) -> np.ndarray:
    """Air kerma per mAs of the Kramers spectrum, arbitrary units."""
    photons, energy, emitted = xray_physics.spectrum(kvp, filtration_mm_al)
    return emitted * (photons * xray_physics.air_kerma_per_photon(energy)).sum(-1)


@functools.cache
def _calibration_output() -> float:
    return float(_relative_output(CALIBRATION_KVP, None)[0])


def tube_output_ugy_per_mas(kvp, filtration_mm_al=None) -> np.ndarray:
    """Air kerma per mAs at 1 m (uGy/mAs), free in air.

    Args:
        kvp: Tube voltage(s), scalar or (B,).
        filtration_mm_al: Total aluminium filtration (mm); None for the default by kVp.

    Returns:
        (B,) tube output.
    """
    relative = _relative_output(kvp, filtration_mm_al) / _calibration_output()
    return TUBE_OUTPUT_UGY_PER_MAS_AT_1M * relative


def air_kerma_ugy(kvp, mas, distance_mm, filtration_mm_al=None) -> np.ndarray:
    """Air kerma (uGy) free in air at ``distance_mm`` from the source (inverse square)."""
    d = np.asarray(distance_mm, dtype=np.float64)
    if not np.isfinite(d).all() or (d <= 0).any():
        raise ValueError(f"distance_mm must be > 0, got {np.atleast_1d(d).tolist()}")
    out = tube_output_ugy_per_mas(kvp, filtration_mm_al) * check_mas(mas)
    return out * (REFERENCE_DISTANCE_MM / d) ** 2


def dose_area_product_mgy_cm2(
    kvp, mas, field_area_cm2, distance_mm, filtration_mm_al=None
) -> np.ndarray:
    """Dose-area product (mGy cm^2) of an exposure.

    Args:
        kvp: Tube voltage(s), scalar or (B,).
        mas: Tube current-time product(s) (mAs), scalar or (B,).
        field_area_cm2: Irradiated (collimated) field area across the beam at ``distance_mm``.
        distance_mm: Distance from the source of the plane where the area is given.
        filtration_mm_al: Total aluminium filtration (mm); None for the default by kVp.

    Returns:
        (B,) DAP; the same for any plane along the beam (area grows as distance squared).
    """
    area = np.asarray(field_area_cm2, dtype=np.float64)
    if not np.isfinite(area).all() or (area < 0).any():
        raise ValueError(f"field_area_cm2 must be >= 0, got {np.atleast_1d(area).tolist()}")
    return air_kerma_ugy(kvp, mas, distance_mm, filtration_mm_al) * area / 1000.0


def exposure_dap_mgy_cm2(
    geometry: XRayGeometry,
    kvp,
    mas,
    filtration_mm_al=None,
) -> torch.Tensor:
    """DAP (mGy cm^2) of each exposure of a geometry, from its collimated field.

    The field's area on the detector is taken across the central ray (times the cosine of
    the detector's tilt to it) at the source-to-detector-centre distance.

    Returns:
        (B,) float32 tensor on the geometry's device.
    """
    size = geometry.field_size_mm  # (B, 2)
    tilt_cos = (geometry.normal * geometry.beam_dir).sum(-1).abs()
    area_cm2 = (size[:, 0] * size[:, 1] * tilt_cos / 100.0).cpu().numpy()
    dist = geometry.source_to_detector_mm.cpu().numpy()
    dap = dose_area_product_mgy_cm2(kvp, mas, area_cm2, dist, filtration_mm_al)
    dap = np.array(np.broadcast_to(dap, (geometry.batch_size,)))
    return torch.as_tensor(dap, dtype=torch.float32, device=geometry.device)


def half_value_layer_mm_al(kvp, filtration_mm_al=None) -> float:
    """First half-value layer (mm Al) of the model beam: the added Al that halves air kerma.

    A check of the spectrum model against measured beams (about 3 mm Al at 80 kVp).
    """
    base = _relative_output(kvp, filtration_mm_al)
    filt = (
        xray_physics.default_filtration_mm_al(kvp) if filtration_mm_al is None else filtration_mm_al
    )
    lo, hi = 0.0, 50.0
    for _ in range(50):  # bisection on a monotone function
        mid = (lo + hi) / 2
        if (_relative_output(kvp, np.asarray(filt) + mid) > base / 2).all():
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2

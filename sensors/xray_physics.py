"""X-ray physics: tube spectrum, NIST attenuation, energy-integrating detector, noise, display.

- Spectrum: Kramers' law (Kramers 1923) for the bremsstrahlung photon number per unit energy,
  dN/dE ~ (kVp - E) / E, hardened by aluminium filtration exp(-mu_Al(E) t); see Bushberg et
  al., *The Essential Physics of Medical Imaging* (3rd ed., 2012), ch. 6. Default total
  filtration follows the MC-GPU spectra used by DeepDRR (3.5 / 4.0 / 4.3 mm Al at 60 / 90 /
  120 kVp, FACTS.md). Photons are grouped into 5 keV bins between 15 and 150 keV.
- Attenuation: mass attenuation coefficients of air, soft tissue and cortical bone (the
  materials of ``sonoray.assets.tissues.XRAY_MATERIALS``) and aluminium, and the mass
  energy-absorption coefficient of air (for kerma), from Hubbell & Seltzer, NIST X-Ray Mass
  Attenuation Coefficients (NIST Standard Reference Database 126), interpolated log-log.
- Detector: ideal energy integrator. Signal = sum over bins of photons x energy x
  exp(-sum_m (mu/rho)_m(E) x path_m), path_m in g/cm^2.
- Noise: the energy-integrated signal is a compound Poisson variable; it is drawn as
  ``epsilon x Poisson(lambda)`` with lambda and epsilon matching its mean and variance
  (lambda = (sum n E)^2 / sum n E^2, the Swank-style effective quanta).
- Display: flat-field (gain) normalisation, log transform, fixed window to 8 bits, bone bright.

Limitations: no characteristic tungsten lines, heel effect or anode self-filtration
(Kramers' continuum only); ideal detector (every photon absorbed, no scintillator
efficiency, no blur); no scatter; the compound-Poisson draw keeps the first two moments only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sonoray.assets.tissues import XRAY_MATERIALS

SOURCES = {
    "NIST": "Hubbell & Seltzer, Tables of X-Ray Mass Attenuation Coefficients and Mass "
    "Energy-Absorption Coefficients, NIST SRD 126 (air dry near sea level; tissue, soft "
    "(ICRU-44); bone, cortical (ICRU-44); aluminium)",
    "Kramers": "H. A. Kramers, Phil. Mag. 46 (1923) 836: bremsstrahlung continuum",
    "DeepDRR": "Unberath et al. 2018, DeepDRR (MC-GPU spectra filtration 3.5/4.0/4.3 mm Al)",
}

# fmt: off
#: Energies (keV) of the tabulated coefficients [NIST].
TABLE_ENERGY_KEV = np.array([10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0, 150.0])

#: Mass attenuation coefficients mu/rho (cm^2/g) per material at ``TABLE_ENERGY_KEV`` [NIST].
MASS_ATTENUATION_CM2_G = {
    "air":         np.array([5.120, 1.614, 0.7779, 0.3538, 0.2485, 0.2080, 0.1875, 0.1662, 0.1541, 0.1356]),  # noqa: E501
    "soft_tissue": np.array([5.379, 1.699, 0.8230, 0.3790, 0.2688, 0.2264, 0.2048, 0.1823, 0.1693, 0.1492]),  # noqa: E501
    "bone":        np.array([28.51, 9.032, 4.001, 1.331, 0.6655, 0.4242, 0.3148, 0.2229, 0.1855, 0.1480]),  # noqa: E501
    "aluminium":   np.array([26.23, 7.955, 3.441, 1.128, 0.5685, 0.3681, 0.2778, 0.2018, 0.1704, 0.1378]),  # noqa: E501
}

#: Mass energy-absorption coefficient of air mu_en/rho (cm^2/g), for air kerma [NIST].
AIR_ENERGY_ABSORPTION_CM2_G = np.array(
    [4.742, 1.334, 0.5389, 0.1537, 0.06833, 0.04098, 0.03041, 0.02407, 0.02325, 0.02496])
# fmt: on

#: Density of aluminium (g/cm^3) [NIST].
ALUMINIUM_DENSITY_G_CM3 = 2.699

#: Energy bins: 5 keV wide from 15 to 150 keV (3.5 mm Al passes 5e-4 of 15 keV photons).
BIN_EDGES_KEV = np.arange(15.0, 150.0 + 1e-6, 5.0)
#: Fine grid step used to integrate the spectrum within each bin (keV).
FINE_STEP_KEV = 0.25

#: Allowed tube voltages (kVp) and total filtration by kVp [DeepDRR].
KVP_RANGE = (40.0, 150.0)
_FILTRATION_KVP = np.array([60.0, 90.0, 120.0])
_FILTRATION_MM_AL = np.array([3.5, 4.0, 4.3])

#: keV -> joule.
JOULE_PER_KEV = 1.602176634e-16

#: Transmission floor: -ln of it is the largest attenuation an image shows (no infinities).
MIN_TRANSMISSION = 1e-9

#: Default display window on the attenuation -ln(I / I0): air black, bone bright.
DEFAULT_WINDOW = (0.0, 8.0)


def log_interp(energy_kev: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Interpolate a coefficient table at ``energy_kev`` linearly in log-log space."""
    e = np.asarray(energy_kev, dtype=np.float64)
    if (e < TABLE_ENERGY_KEV[0]).any() or (e > TABLE_ENERGY_KEV[-1]).any():
        raise ValueError(
            f"energies must lie in [{TABLE_ENERGY_KEV[0]}, {TABLE_ENERGY_KEV[-1]}] keV, "
            f"got {e.min()}..{e.max()}"
        )
    return np.exp(np.interp(np.log(e), np.log(TABLE_ENERGY_KEV), np.log(table)))


def mass_attenuation(energy_kev, materials: Sequence[str] = XRAY_MATERIALS) -> np.ndarray:
    """(E, M) mu/rho (cm^2/g) of ``materials`` at ``energy_kev`` (tissue names map to rows).

    ``XRAY_MATERIALS`` names soft tissue ``soft_tissue`` and bone ``bone``.
    """
    unknown = [m for m in materials if m not in MASS_ATTENUATION_CM2_G]
    if unknown:
        raise KeyError(f"no attenuation table for {unknown}; known: {list(MASS_ATTENUATION_CM2_G)}")
    e = np.atleast_1d(np.asarray(energy_kev, dtype=np.float64))
    return np.stack([log_interp(e, MASS_ATTENUATION_CM2_G[m]) for m in materials], axis=-1)


def default_filtration_mm_al(kvp) -> np.ndarray:
    """Total aluminium filtration (mm) by kVp, interpolated from DeepDRR's spectra."""
    return np.interp(np.asarray(kvp, dtype=np.float64), _FILTRATION_KVP, _FILTRATION_MM_AL)


def per_item(values, batch: int, name: str) -> np.ndarray:
    """A scalar or (B,) array-like as a (B,) float64 array; raise naming ``name`` otherwise."""
    v = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if v.ndim != 1 or v.size not in (1, batch):
        raise ValueError(f"{name} must be a scalar or ({batch},), got shape {v.shape}")
    return np.array(np.broadcast_to(v, (batch,)))


def check_kvp(kvp) -> np.ndarray:
    """Validate tube voltages; return them as a float64 array."""
    k = np.atleast_1d(np.asarray(kvp, dtype=np.float64))
    lo, hi = KVP_RANGE
    if not np.isfinite(k).all() or (k < lo).any() or (k > hi).any():
        raise ValueError(f"kVp must lie in [{lo}, {hi}], got {k.tolist()}")
    return k


@dataclass(frozen=True)
class Beam:
    """Photon spectra and coefficient tables of B exposures, on the host.

    Attributes:
        photons: (B, E) relative photons per energy bin (sums to 1 per item).
        energy_kev: (B, E) mean photon energy of each bin.
        mu_cm2_g: (B, E, M) mass attenuation of each material of ``XRAY_MATERIALS``.
        kerma_ugy_mm2: (B, E) air kerma (uGy) per photon per mm^2 of each bin.
    """

    photons: np.ndarray
    energy_kev: np.ndarray
    mu_cm2_g: np.ndarray
    kerma_ugy_mm2: np.ndarray

    @property
    def kerma_per_photon_ugy_mm2(self) -> np.ndarray:
        """(B,) mean air kerma per photon per mm^2 of the spectrum."""
        return (self.photons * self.kerma_ugy_mm2).sum(-1)


def spectrum(kvp, filtration_mm_al=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative photon spectrum per energy bin (Kramers' law with Al filtration).

    Args:
        kvp: Tube voltage(s), scalar or (B,), within ``KVP_RANGE``.
        filtration_mm_al: Total aluminium filtration (mm), scalar or (B,); None for the
            default of :func:`default_filtration_mm_al`.

    Returns:
        ``(photons, energy_kev, relative_yield)``: (B, E) photons per bin, normalised to sum
        1; (B, E) the mean photon energy in each bin (the bin centre where a bin is empty);
        (B,) the photon number before normalisation (Kramers' law has no absolute scale;
        :mod:`sonoray.sensors.dose` sets it).
    """
    k = check_kvp(kvp)
    filt = default_filtration_mm_al(k) if filtration_mm_al is None else filtration_mm_al
    filt = np.atleast_1d(np.asarray(filt, dtype=np.float64))
    if not np.isfinite(filt).all() or (filt < 0).any():
        raise ValueError(f"filtration_mm_al must be >= 0, got {filt.tolist()}")
    if filt.ndim != 1 or k.ndim != 1 or (filt.size != k.size and 1 not in (k.size, filt.size)):
        raise ValueError(
            f"kVp {k.tolist()} and filtration {filt.tolist()} must be scalars or (B,) of one size"
        )
    k, filt = np.broadcast_arrays(k, filt)

    # Fine grid (keV) inside the bins; Kramers number spectrum times the filter transmission.
    fine = np.arange(BIN_EDGES_KEV[0] + FINE_STEP_KEV / 2, BIN_EDGES_KEV[-1], FINE_STEP_KEV)
    mu_al = log_interp(fine, MASS_ATTENUATION_CM2_G["aluminium"]) * ALUMINIUM_DENSITY_G_CM3
    n = np.clip(k[:, None] - fine[None, :], 0.0, None) / fine[None, :]  # (B, F)
    n = n * np.exp(-mu_al[None, :] * filt[:, None] / 10.0)  # mm -> cm

    # Sum within bins (one-hot bin matrix); mean energy per bin.
    index = np.digitize(fine, BIN_EDGES_KEV) - 1
    onehot = np.eye(BIN_EDGES_KEV.size - 1)[index]  # (F, E)
    photons = n @ onehot
    energy_sum = (n * fine[None, :]) @ onehot
    centres = (BIN_EDGES_KEV[:-1] + BIN_EDGES_KEV[1:]) / 2
    energy = np.where(photons > 0, energy_sum / np.where(photons > 0, photons, 1.0), centres)
    total = photons.sum(-1)
    return photons / total[:, None], energy, total * FINE_STEP_KEV


def beam(kvp, filtration_mm_al=None, monoenergetic_kev=None) -> Beam:
    """Spectrum and coefficient tables for B exposures.

    Args:
        kvp: Tube voltage(s), scalar or (B,).
        filtration_mm_al: Total aluminium filtration (mm); None for the default.
        monoenergetic_kev: If given (scalar or (B,)), a single-energy beam for checks:
            the transmission is then exactly exp(-sum_m mu_m path_m). The tube's kVp still
            sets the air kerma (dose) of the exposure.
    """
    photons, energy, _ = spectrum(kvp, filtration_mm_al)  # also validates kvp and filtration
    if monoenergetic_kev is not None:
        e = np.atleast_1d(np.asarray(monoenergetic_kev, dtype=np.float64))
        lo, hi = TABLE_ENERGY_KEV[0], TABLE_ENERGY_KEV[-1]
        if not np.isfinite(e).all() or (e < lo).any() or (e > hi).any():
            raise ValueError(f"monoenergetic_kev must lie in [{lo}, {hi}], got {e.tolist()}")
        energy = np.broadcast_to(e, np.broadcast_shapes(e.shape, photons.shape[:1]))
        energy = energy[:, None].copy()
        photons = np.ones_like(energy)
    used = int(np.nonzero(photons.any(0))[0].max()) + 1  # bins above every kVp are empty
    photons, energy = photons[:, :used], energy[:, :used]
    mu = mass_attenuation(energy.ravel()).reshape(*energy.shape, len(XRAY_MATERIALS))
    return Beam(photons, energy, mu, air_kerma_per_photon(energy))


def air_kerma_per_photon(energy_kev: np.ndarray) -> np.ndarray:
    """Air kerma (uGy) per photon per mm^2 at ``energy_kev``: E x (mu_en/rho)_air."""
    mu_en = log_interp(energy_kev, AIR_ENERGY_ABSORPTION_CM2_G)  # cm^2/g
    # keV -> J; J cm^2/g x 1e3 g/kg = Gy cm^2; 1 photon/mm^2 = 100 /cm^2; Gy -> uGy.
    return energy_kev * JOULE_PER_KEV * mu_en * 1e3 * 100.0 * 1e6


def detector_response(
    path_g_cm2: torch.Tensor,
    fluence_per_mm2: torch.Tensor,
    beam: Beam,
) -> torch.Tensor:
    """Energy-integrating detector behind material paths, per mm^2 of detector.

    Args:
        path_g_cm2: (B, M, H, W) path of each material of ``XRAY_MATERIALS`` (g/cm^2).
        fluence_per_mm2: (B, H, W) photons per mm^2 reaching each pixel without attenuation.
        beam: The B exposures' spectra (``beam.photons`` sums to 1 per item) and tables.

    Returns:
        (B, 3, H, W): ``sum Phi E T`` (energy fluence, keV/mm^2), ``sum Phi E^2 T`` (its
        Poisson variance per mm^2, keV^2/mm^2) and ``sum Phi K T`` (air kerma, uGy), with
        ``Phi`` the photon fluence per bin, ``K`` the air kerma per photon per mm^2 and
        ``T = exp(-sum_m (mu/rho)_m path_m)``.
    """
    like = {"dtype": path_g_cm2.dtype, "device": path_g_cm2.device}
    mu = torch.as_tensor(beam.mu_cm2_g, **like)  # (B, E, M)
    p = torch.as_tensor(beam.photons, **like)
    e = torch.as_tensor(beam.energy_kev, **like)
    k = torch.as_tensor(beam.kerma_ugy_mm2, **like)
    weights = torch.stack([p * e, p * e**2, p * k], -1)  # (B, E, 3)
    att = torch.exp(-torch.einsum("bmhw,bem->behw", path_g_cm2, mu))  # (B, E, H, W)
    return torch.einsum("behw,bek->bkhw", att, weights) * fluence_per_mm2[:, None]


def poisson_compound(
    signal: torch.Tensor, variance: torch.Tensor, seeds: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Noisy energy-integrated signal with the mean and variance of its compound Poisson law.

    Draws ``epsilon x Poisson(lambda)`` with ``lambda = signal^2 / variance`` and
    ``epsilon = variance / signal``; pixels without photons stay 0 (no NaN).

    Args:
        signal: (B, ...) mean signal (keV).
        variance: (B, ...) its variance (keV^2).
        seeds: One integer seed per batch item; item b's noise depends on ``seeds[b]`` and
            its own signal only, so a batch equals its items drawn one by one.
    """
    seeds = [int(s) for s in torch.as_tensor(seeds).reshape(-1).tolist()]
    if len(seeds) != signal.shape[0]:
        raise ValueError(f"need one noise seed per batch item ({signal.shape[0]}), got {seeds}")
    has = variance > 0
    lam = torch.where(has, signal**2 / torch.where(has, variance, 1.0), 0.0)
    eps = torch.where(has, variance / torch.where(signal > 0, signal, 1.0), 0.0)
    # torch has no batched generator: one draw per item, each over all of its pixels.
    counts = torch.stack(
        [
            torch.poisson(lam[b], generator=torch.Generator(lam.device).manual_seed(s))
            for b, s in enumerate(seeds)
        ]
    )
    return eps * counts


def attenuation_from_transmission(transmission: torch.Tensor) -> torch.Tensor:
    """-ln(I / I0), finite: transmission below ``MIN_TRANSMISSION`` (no photons) is clamped."""
    return -torch.log(transmission.clamp(min=MIN_TRANSMISSION))


def window_to_uint8(
    attenuation: torch.Tensor,
    window: tuple[float, float] = DEFAULT_WINDOW,
) -> torch.Tensor:
    """Map attenuation -ln(I / I0) through a fixed window to uint8, bone (high) bright.

    The window is fixed, not taken from the image: a pixel's value depends on its own ray only.
    """
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window}")
    scaled = (attenuation - lo) / (hi - lo)
    return (scaled.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)

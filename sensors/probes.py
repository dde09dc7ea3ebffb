"""Ultrasound probe presets and their scan-line geometry in the probe frame.

Probe frame (millimetres): origin at the centre of the probe face; +z along the
beam into the tissue (depth); +x along the array (lateral), the image column
index increasing along +x, with the probe's marker at the -x end (column 0 is on
the marker side); +y = z cross x is the elevation direction. The image plane is
the probe's x-z plane.

Presets follow the Verasonics C5-2v (convex) and L11-5v (linear) probes as
parameterised in PyMUST / MUST (Garcia 2021, ``getparam``, numbers from
Verasonics' ``computeTrans.m``). There is one scan line per element, starting
at the element's centre and running along its normal; per-line coupling
therefore equals per-element coupling.

Limitations: beam widths are rule-of-thumb values (two-way -6 dB width about
wavelength x F-number), not a computed beam pattern; the imaging depths are
typical clinical settings, not probe properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sonoray.assets.tissues import tissue

SOURCES = {
    "MUST": "PyMUST / MUST getparam (Garcia 2021), from Verasonics computeTrans.m",
    "Clinical": "typical abdominal (convex) and superficial (linear) imaging depths (approx.)",
    "Szabo": "Szabo, Diagnostic Ultrasound Imaging (2014): resolution ~ wavelength x F-number",
}

#: 2 sqrt(2 ln 2): full width at half maximum of a Gaussian per unit standard deviation.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))

#: Speed of sound that sets wavelengths and pulse lengths (soft tissue, from the tissue table).
SPEED_OF_SOUND_MM_US = tissue("soft_tissue").speed_m_s * 1e-3


@dataclass(frozen=True)
class ProbePreset:
    """One ultrasound probe: array geometry, pulse and default imaging depth.

    Attributes:
        name: Preset key (``"convex"`` or ``"linear"``).
        model: The commercial probe whose numbers these are.
        center_frequency_mhz: Centre frequency [MUST].
        fractional_bandwidth: Pulse-echo -6 dB bandwidth over centre frequency [MUST].
        n_elements: Number of array elements (= scan lines) [MUST].
        pitch_mm: Element pitch [MUST].
        radius_mm: Radius of curvature of the array; ``math.inf`` for a linear array [MUST].
        elevation_height_mm: Element height in elevation [MUST].
        elevation_focus_mm: Focal depth of the elevation lens [MUST].
        depth_mm: Default imaging depth [Clinical].
        f_number: Receive F-number with dynamic focusing, sets the lateral beam width [Szabo].
        source: Keys of ``SOURCES`` for these numbers.
    """

    name: str
    model: str
    center_frequency_mhz: float
    fractional_bandwidth: float
    n_elements: int
    pitch_mm: float
    radius_mm: float
    elevation_height_mm: float
    elevation_focus_mm: float
    depth_mm: float
    f_number: float
    source: str

    @property
    def is_convex(self) -> bool:
        return math.isfinite(self.radius_mm)

    @property
    def wavelength_mm(self) -> float:
        return SPEED_OF_SOUND_MM_US / self.center_frequency_mhz

    @property
    def aperture_mm(self) -> float:
        """Length of the array along its face (arc length for a convex array)."""
        return self.n_elements * self.pitch_mm

    @property
    def line_angle_step_rad(self) -> float:
        """Angle between neighbouring scan lines (0 for a linear array)."""
        return self.pitch_mm / self.radius_mm if self.is_convex else 0.0

    @property
    def field_of_view_deg(self) -> float:
        """Angle the array face subtends (0 for a linear array): 75 degrees for the C5-2v."""
        return math.degrees(self.n_elements * self.line_angle_step_rad)

    @property
    def axial_sigma_mm(self) -> float:
        """Standard deviation of the Gaussian pulse-echo envelope along depth.

        A Gaussian pulse whose spectrum has -6 dB full width B f_c has an envelope of
        standard deviation sqrt(2 ln 2) / (pi B f_c) in time; depth is half the round trip.
        """
        sigma_us = math.sqrt(2.0 * math.log(2.0)) / (
            math.pi * self.fractional_bandwidth * self.center_frequency_mhz
        )
        return 0.5 * SPEED_OF_SOUND_MM_US * sigma_us

    @property
    def lateral_sigma_mm(self) -> float:
        """Lateral beam width (Gaussian sigma) with two-way -6 dB width ~ wavelength x F-number."""
        return self.wavelength_mm * self.f_number / FWHM_PER_SIGMA

    @property
    def elevation_width_mm(self) -> float:
        """Elevation -6 dB beam width at the lens focus, ~ wavelength x focus / height."""
        return self.wavelength_mm * self.elevation_focus_mm / self.elevation_height_mm


#: Probe presets by name.
PRESETS: dict[str, ProbePreset] = {
    "convex": ProbePreset(
        name="convex",
        model="Verasonics C5-2v",
        center_frequency_mhz=3.57,
        fractional_bandwidth=0.79,
        n_elements=128,
        pitch_mm=0.508,
        radius_mm=49.57,
        elevation_height_mm=13.5,
        elevation_focus_mm=60.0,
        depth_mm=150.0,
        f_number=2.0,
        source="MUST; Clinical; Szabo",
    ),
    "linear": ProbePreset(
        name="linear",
        model="Verasonics L11-5v",
        center_frequency_mhz=7.6,
        fractional_bandwidth=0.77,
        n_elements=128,
        pitch_mm=0.3,
        radius_mm=math.inf,
        elevation_height_mm=5.0,
        elevation_focus_mm=18.0,
        depth_mm=60.0,
        f_number=2.0,
        source="MUST; Clinical; Szabo",
    ),
}


def get_preset(preset: str | ProbePreset) -> ProbePreset:
    """The preset called ``preset`` (a :class:`ProbePreset` passes through).

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if isinstance(preset, ProbePreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown probe preset {preset!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[preset]


def line_angles_rad(preset: str | ProbePreset) -> torch.Tensor:
    """Steering angle of each scan line about +y, from -x towards +z (float64, (L,)).

    Zero for every line of a linear array; for a convex array the angles are
    spaced by pitch / radius and symmetric about the probe axis.
    """
    p = get_preset(preset)
    index = torch.arange(p.n_elements, dtype=torch.float64) - 0.5 * (p.n_elements - 1)
    return index * p.line_angle_step_rad


def element_positions_mm(
    preset: str | ProbePreset, dtype: torch.dtype = torch.float64, device=None
) -> torch.Tensor:
    """Centres of the elements on the probe face in the probe frame, ``(n_elements, 3)``.

    Element 0 is at the marker (-x) end. For a convex array the face is an arc of
    the given radius whose centre lies at ``(0, 0, -radius)``, so the central
    elements touch z = 0 and the outer ones sit slightly behind it (z < 0).
    """
    p = get_preset(preset)
    if p.is_convex:
        theta = line_angles_rad(p)
        x = p.radius_mm * torch.sin(theta)
        z = p.radius_mm * (torch.cos(theta) - 1.0)
    else:
        x = (
            torch.arange(p.n_elements, dtype=torch.float64) - 0.5 * (p.n_elements - 1)
        ) * p.pitch_mm
        z = torch.zeros_like(x)
    return torch.stack([x, torch.zeros_like(x), z], dim=-1).to(dtype=dtype, device=device)


def scan_lines(
    preset: str | ProbePreset, dtype: torch.dtype = torch.float64, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins and unit directions of the scan lines in the probe frame, each ``(L, 3)``.

    One line per element: it starts at the element centre and runs along the
    face normal (radially outwards for a convex array, +z for a linear one).
    """
    p = get_preset(preset)
    origins = element_positions_mm(p, dtype=torch.float64)
    theta = line_angles_rad(p)
    directions = torch.stack([torch.sin(theta), torch.zeros_like(theta), torch.cos(theta)], -1)
    return origins.to(dtype=dtype, device=device), directions.to(dtype=dtype, device=device)

"""Tissue table: the one place for every tissue's X-ray and acoustic numbers.

Each tissue row holds its CT number range, mass density, X-ray material class,
speed of sound, acoustic impedance, attenuation slope and echogenicity. The
numbers come from published tables named in ``SOURCES`` and cited per row.

X-ray material class and density are normally derived from HU (see
``density_from_hu`` and ``xray_material_from_hu``); the per-tissue values here
are the typical ones, used for checks and for the procedural phantom.

Limitations: echogenicity is a relative backscatter amplitude in [0, 1]
ordered as clinical B-mode images show tissues (anechoic blood and fluid,
hypoechoic fat and kidney cortex, brighter liver and spleen, bright bone and
pleura); there is no single published scale, so these are defaults to tune.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SOURCES = {
    "NIST": "NIST XCOM / X-Ray Mass Attenuation Coefficients (Hubbell & Seltzer)",
    "DeepDRR": "DeepDRR HU-to-density fit and material thresholds (Unberath et al. 2018)",
    "D23": "Diagnostics 2023;13:855, Table 4 (acoustic properties of tissues)",
    "S23": "Sensors 2023;23:5942, Table A2 (acoustic properties of tissues)",
    "Goss": "Goss, Johnston & Dunn 1978/1980 and Mast 2000, as compiled in "
    "Mech. Mater. 2012, Table 3",
    "ICRU46": "ICRU Report 46 (1992): tissue densities",
    "Duck": "Duck 1990, Physical Properties of Tissue, ch. 4 (hyaline cartilage; approx.)",
    "CT": "Typical unenhanced adult CT numbers (radiology teaching references)",
    "Clinical": "Relative B-mode echogenicity from clinical convention (approx.)",
}

#: X-ray material classes, in the order the sensors index them.
XRAY_MATERIALS = ("air", "soft_tissue", "bone")

#: HU thresholds between the X-ray material classes [DeepDRR].
AIR_MAX_HU = -800.0
SOFT_TISSUE_MAX_HU = 350.0

#: Any CT value below this is out-of-field padding or air (scanners pad with -2048, -3024).
PADDING_BELOW_HU = -1024.0


@dataclass(frozen=True)
class Tissue:
    """One tissue's physical numbers.

    Attributes:
        name: Identifier used in tables and label mappings.
        hu_mean: Typical CT number (HU) [CT].
        hu_range: (low, high) CT numbers expected for this tissue (HU) [CT].
        density_g_cm3: Mass density [ICRU46].
        xray_material: One of ``XRAY_MATERIALS``.
        speed_m_s: Speed of sound.
        impedance_mrayl: Characteristic acoustic impedance (MRayl = 1e6 kg m^-2 s^-1).
        attenuation_db_cm_mhz: Attenuation slope (dB per cm per MHz, one way).
        echogenicity: Relative backscatter amplitude in [0, 1] [Clinical].
        source: Keys of ``SOURCES`` the acoustic numbers come from.
    """

    name: str
    hu_mean: float
    hu_range: tuple[float, float]
    density_g_cm3: float
    xray_material: str
    speed_m_s: float
    impedance_mrayl: float
    attenuation_db_cm_mhz: float
    echogenicity: float
    source: str


# fmt: off
TISSUES: tuple[Tissue, ...] = (
    # name, HU, HU range, rho, X-ray class, c, Z, alpha, echogenicity, source keys
    Tissue("air", -1000, (-1024, -900), 0.0012, "air", 331, 0.0004, 7.5, 0.00, "D23"),
    Tissue("lung", -850, (-950, -650), 0.26, "air", 650, 0.30, 40.0, 0.60, "D23; S23 (approx.)"),
    Tissue("fat", -100, (-150, -50), 0.95, "soft_tissue", 1450, 1.38, 0.6, 0.35, "D23; Goss"),
    Tissue("water", 0, (-10, 20), 1.00, "soft_tissue", 1480, 1.48, 0.002, 0.00, "D23"),
    Tissue("fluid", 10, (0, 25), 1.01, "soft_tissue", 1500, 1.52, 0.05, 0.02, "D23 (~water)"),
    Tissue("blood", 40, (30, 55), 1.06, "soft_tissue", 1584, 1.68, 0.18, 0.03, "D23; Goss"),
    Tissue("soft_tissue", 40, (-30, 100), 1.03, "soft_tissue", 1540, 1.63, 0.7, 0.45, "D23"),
    Tissue("skin", 30, (0, 80), 1.09, "soft_tissue", 1650, 1.80, 0.35, 0.80, "S23; D23"),
    Tissue("muscle", 45, (30, 60), 1.05, "soft_tissue", 1580, 1.70, 1.0, 0.40, "D23; Goss"),
    Tissue("liver", 60, (45, 75), 1.06, "soft_tissue", 1570, 1.65, 0.5, 0.60, "D23; Goss"),
    Tissue("spleen", 50, (40, 65), 1.05, "soft_tissue", 1567, 1.65, 0.5, 0.65, "Goss (~liver)"),
    Tissue("kidney", 35, (25, 50), 1.05, "soft_tissue", 1560, 1.64, 1.0, 0.40, "D23; Goss"),
    Tissue("stomach", 25, (0, 50), 1.03, "soft_tissue", 1540, 1.60, 0.6, 0.30, "D23 (wall)"),
    Tissue("cancellous_bone", 300, (200, 400), 1.18, "soft_tissue", 2500, 4.5, 10.0, 0.9, "S23"),
    Tissue("cortical_bone", 1100, (700, 1500), 1.85, "bone", 3500, 7.0, 15.0, 1.0, "D23; S23"),
    Tissue("cartilage", 120, (60, 250), 1.10, "soft_tissue", 1660, 1.83, 1.5, 0.25, "Duck"),
)
# fmt: on

TISSUE_IDS: dict[str, int] = {t.name: i for i, t in enumerate(TISSUES)}


def tissue(name: str) -> Tissue:
    """Return the tissue called ``name``; raise ``KeyError`` listing the known ones."""
    try:
        return TISSUES[TISSUE_IDS[name]]
    except KeyError:
        raise KeyError(f"unknown tissue {name!r}; known tissues: {sorted(TISSUE_IDS)}") from None


def tissue_property(field: str) -> np.ndarray:
    """One property of every tissue as a float32 array indexed by tissue id.

    Args:
        field: A numeric field of :class:`Tissue`, e.g. ``"impedance_mrayl"``.
    """
    allowed = (
        "hu_mean",
        "density_g_cm3",
        "speed_m_s",
        "impedance_mrayl",
        "attenuation_db_cm_mhz",
        "echogenicity",
    )
    if field not in allowed:
        raise ValueError(f"tissue property {field!r} is not numeric; allowed: {allowed}")
    return np.array([getattr(t, field) for t in TISSUES], dtype=np.float32)


# Labelled structures (TotalSegmentator names) to tissues: first matching pattern wins.
_STRUCTURE_TISSUE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"^lung_|^lung$", "lung"),
    (r"^trachea$|^airway", "air"),
    (r"^liver$", "liver"),
    (r"^spleen$", "spleen"),
    (r"^kidney_(left|right)$", "kidney"),
    (r"^kidney_cyst", "fluid"),
    (r"^stomach$", "stomach"),
    (r"^(gallbladder|urinary_bladder)$", "fluid"),
    (r"^heart", "blood"),
    (r"aorta|vena_cava|artery|vein|atrial_appendage|^brachiocephalic_trunk$", "blood"),
    (r"^costal_cartilages$", "cartilage"),
    (
        r"^(vertebrae_|rib_|sternum|sacrum|hip_|scapula_|clavicula_|humerus_|femur_|skull)",
        "cortical_bone",
    ),
    (r"^(autochthon_|iliopsoas_|gluteus_|muscle)", "muscle"),
    (r"^skin$", "skin"),
    (r"^(subcutaneous_fat|fat)$", "fat"),
)


def tissue_of_structure(structure: str) -> str | None:
    """Tissue name for a labelled structure, or None to classify the voxels from HU.

    Bone structures map to cortical bone: for ultrasound only their surface matters
    (it reflects and shadows); X-ray attenuation always comes from HU.
    """
    for pattern, name in _STRUCTURE_TISSUE_PATTERNS:
        if re.search(pattern, structure):
            return name
    return None


# Unlabelled voxels are classified from HU into these tissues (upper bounds, HU).
_HU_CLASSES: tuple[tuple[float, str], ...] = (
    (-400.0, "air"),
    (-30.0, "fat"),
    (150.0, "soft_tissue"),
    (SOFT_TISSUE_MAX_HU, "cancellous_bone"),
    (np.inf, "cortical_bone"),
)


def tissue_from_hu(hu: np.ndarray) -> np.ndarray:
    """Classify unlabelled voxels into tissue ids from their HU (int8 array, same shape)."""
    bounds = np.array([b for b, _ in _HU_CLASSES[:-1]], dtype=np.float32)
    ids = np.array([TISSUE_IDS[n] for _, n in _HU_CLASSES], dtype=np.int8)
    return ids[np.searchsorted(bounds, hu, side="left")]


def density_from_hu(hu: np.ndarray) -> np.ndarray:
    """Mass density (g/cm^3) from HU with the two-segment fit used by DeepDRR.

    rho = max(min(0.001029 HU + 1.030, 0.0005886 HU + 1.03), 0)
    """
    hu = np.asarray(hu, dtype=np.float32)
    return np.maximum(np.minimum(0.001029 * hu + 1.030, 0.0005886 * hu + 1.03), 0.0)


def xray_material_from_hu(hu: np.ndarray) -> np.ndarray:
    """X-ray material index into ``XRAY_MATERIALS`` from HU [DeepDRR thresholds]."""
    hu = np.asarray(hu)
    return (hu > AIR_MAX_HU).astype(np.int8) + (hu > SOFT_TISSUE_MAX_HU).astype(np.int8)

"""The patient twin: CT numbers, organ labels, their affine and the skin surface.

A :class:`Patient` is the same object whether it comes from the procedural
phantom or from a real CT. Arrays are indexed ``[i, j, k]`` (voxel indices)
and ``affine`` maps ``(i, j, k, 1)`` to patient millimetres in RAS (+x towards
the patient's right, +y anterior, +z superior). Structure names follow
TotalSegmentator; group names (``lungs``, ``ribs``, ``spine`` ...) resolve to
their members on any patient.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from sonoray.assets import tissues

#: Group name -> regular expression over structure names (TotalSegmentator naming).
STRUCTURE_GROUPS: dict[str, str] = {
    "lungs": r"^lung_",
    "lung_left": r"^lung_(upper|lower)_lobe_left$",
    "lung_right": r"^lung_(upper|middle|lower)_lobe_right$",
    "ribs": r"^rib_",
    "ribs_left": r"^rib_left_",
    "ribs_right": r"^rib_right_",
    "vertebrae": r"^vertebrae_",
    "spine": r"^(vertebrae_|sacrum$)",
    "kidneys": r"^kidney_(left|right)$",
    "hips": r"^hip_(left|right)$",
    "pelvis": r"^(hip_left|hip_right|sacrum)$",
    "bones": r"^(vertebrae_|rib_|sternum$|sacrum$|hip_|scapula_|clavicula_|humerus_|femur_|skull$)",
}


@dataclass(eq=False)
class Patient:
    """A patient twin on a voxel grid.

    Attributes:
        name: Identifier, e.g. ``"phantom-0007"`` or the CT file name.
        hu: CT numbers, float32 ``(I, J, K)``; air is -1000, no padding values.
        labels: Structure ids, int16 ``(I, J, K)``; 0 = no structure.
        label_names: Structure id -> TotalSegmentator name.
        affine: 4 x 4 voxel -> patient RAS mm.
        body_mask: bool ``(I, J, K)``: the patient alone (no table, no padding).
        meta: Free-form provenance (seed, parameters, source files).
    """

    name: str
    hu: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    affine: np.ndarray
    body_mask: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"hu must be 3-D, got shape {self.hu.shape}")
        for what, arr in (("labels", self.labels), ("body_mask", self.body_mask)):
            if arr.shape != self.hu.shape:
                raise ValueError(f"{what} shape {arr.shape} differs from hu shape {self.hu.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4 x 4, got {self.affine.shape}")

    # ----- geometry -------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size along i, j, k (mm)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def voxel_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` to patient RAS mm ``(..., 3)``."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_voxel(self, xyz_mm: np.ndarray) -> np.ndarray:
        """Map patient RAS mm ``(..., 3)`` to (fractional) voxel indices ``(..., 3)``."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(xyz_mm, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]

    @cached_property
    def body_bounds_mm(self) -> np.ndarray:
        """(2, 3) min and max corners of the body mask's voxel centres in patient mm."""
        idx = np.argwhere(self.body_mask)
        corners = self.voxel_to_patient(np.stack([idx.min(0), idx.max(0)]))
        return np.stack([corners.min(0), corners.max(0)])

    # ----- structures -----------------------------------------------------------------------

    @property
    def structures(self) -> list[str]:
        """Names of the structures present in the label volume, sorted."""
        return sorted(self.label_names[i] for i in self._present_ids)

    @cached_property
    def _present_ids(self) -> list[int]:
        return [int(i) for i in np.unique(self.labels) if i != 0 and int(i) in self.label_names]

    def structure_ids(self, name: str) -> list[int]:
        """Label ids for a structure or group name present in this patient.

        Raises:
            KeyError: if neither a structure nor a group of that name is present; the
                message lists the structures and groups this patient has.
        """
        by_name = {self.label_names[i]: i for i in self._present_ids}
        if name in by_name:
            return [by_name[name]]
        if name in STRUCTURE_GROUPS:
            ids = sorted(i for n, i in by_name.items() if re.search(STRUCTURE_GROUPS[name], n))
            if ids:
                return ids
        groups = [g for g, p in STRUCTURE_GROUPS.items() if any(re.search(p, n) for n in by_name)]
        raise KeyError(
            f"patient {self.name!r} has no structure {name!r}; it has {sorted(by_name)} "
            f"and groups {groups}"
        )

    def has_structure(self, name: str) -> bool:
        try:
            self.structure_ids(name)
        except KeyError:
            return False
        return True

    def mask(self, name: str) -> np.ndarray:
        """Boolean mask of a structure or group."""
        return np.isin(self.labels, self.structure_ids(name))

    def volume_ml(self, name: str) -> float:
        """Volume of a structure or group in millilitres."""
        return float(self.mask(name).sum() * np.prod(self.spacing_mm) / 1000.0)

    def centroid_mm(self, name: str) -> np.ndarray:
        """Centroid of a structure or group in patient RAS mm."""
        return self.voxel_to_patient(np.argwhere(self.mask(name)).mean(0))

    # ----- derived material maps ------------------------------------------------------------

    @cached_property
    def tissue_map(self) -> np.ndarray:
        """Tissue id per voxel (int8, indices into ``tissues.TISSUES``).

        Labelled voxels take their structure's tissue; unlabelled ones (skin, fat and
        muscle in most real CTs) are classified from HU; outside the body is air; the
        outermost body layer (about 2 mm) is skin.
        """
        out = tissues.tissue_from_hu(self.hu)
        lut = np.full(max(self.label_names, default=0) + 1, -1, dtype=np.int8)
        for i, n in self.label_names.items():
            t = tissues.tissue_of_structure(n)
            if t is not None:
                lut[i] = tissues.TISSUE_IDS[t]
        mapped = lut[np.clip(self.labels, 0, len(lut) - 1)]
        labelled = (self.labels > 0) & (self.labels < len(lut)) & (mapped >= 0)
        out[labelled] = mapped[labelled]
        out[self.skin_shell] = tissues.TISSUE_IDS["skin"]
        out[~self.body_mask] = tissues.TISSUE_IDS["air"]
        return out

    @cached_property
    def skin_shell(self) -> np.ndarray:
        """Body voxels within about 2 mm of the body surface."""
        from scipy import ndimage

        steps = max(1, int(round(2.0 / float(self.spacing_mm.min()))))
        inner = ndimage.binary_erosion(self.body_mask, iterations=steps, border_value=0)
        return self.body_mask & ~inner

    @cached_property
    def skin_mesh(self):
        """Skin surface as a ``trimesh.Trimesh`` in patient mm (built on first use)."""
        from sonoray.assets.skin_mesh import skin_mesh_from_mask

        return skin_mesh_from_mask(self.body_mask, self.affine)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.2f}" for s in self.spacing_mm)
        return (
            f"Patient({self.name!r}, shape={self.shape}, spacing_mm=({sp}), "
            f"structures={len(self._present_ids)})"
        )

"""A seeded pool of patients an env draws from each episode.

Procedural phantom ``k`` of a pool with base seed ``s`` is ``make_phantom(s + k)``, so
the same pool holds the same patients in every process. A pool can instead hold
one real CT. Patients are built once per process and cached: envs that share a
pool (vectorised copies, repeated construction in tests) share its patients.

Limitations: the cache keeps every patient ever built alive for the life of the
process (a phantom is tens of MB); a CT pool holds one patient.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from sonoray.assets.patient import Patient


class PatientPool:
    """An ordered, immutable set of patients, built once and cached in-process.

    Args:
        n_patients: How many procedural phantoms (at least 1).
        base_seed: Phantom ``k`` has seed ``base_seed + k`` (non-negative).

    Attributes:
        patients: The patients, in pool order.
        source: ``"phantom"`` or ``"ct"``.
    """

    def __init__(self, n_patients: int = 4, base_seed: int = 0) -> None:
        if isinstance(n_patients, bool) or not isinstance(n_patients, (int, np.integer)):
            raise ValueError(f"n_patients must be an integer >= 1, got {n_patients!r}")
        if n_patients < 1:
            raise ValueError(f"n_patients must be >= 1, got {n_patients}")
        if isinstance(base_seed, bool) or not isinstance(base_seed, (int, np.integer)):
            raise ValueError(f"base_seed must be an integer >= 0, got {base_seed!r}")
        if base_seed < 0:
            raise ValueError(f"base_seed must be >= 0, got {base_seed}")
        self.patients: tuple[Patient, ...] = tuple(
            _phantom(int(base_seed) + k) for k in range(int(n_patients))
        )
        self.source = "phantom"

    @classmethod
    def from_ct(
        cls, path: str | Path, labels: str | Path | None = None, spacing_mm: float | None = None
    ) -> PatientPool:
        """A pool of one real CT (see ``sonoray.assets.ct.load_ct`` for the formats).

        Args:
            path: CT file (NIfTI), DICOM series folder, or a folder holding ``ct.nii.gz``
                (with ``labels.nii.gz`` and ``structures.csv`` when labelled).
            labels: Label volume in TotalSegmentator naming, if not in the CT's folder.
            spacing_mm: Resample to this isotropic voxel size (mm); ``None`` keeps the CT's.
        """
        pool = cls.__new__(cls)
        pool.patients = (
            _ct(
                str(Path(path).resolve()),
                None if labels is None else str(Path(labels).resolve()),
                spacing_mm,
            ),
        )
        pool.source = "ct"
        return pool

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> Patient:
        return self.patients[index]

    def pick(self, rng: np.random.Generator, options: dict | None = None) -> int:
        """Index of the patient for an episode: drawn from ``rng``, or ``reset`` options'
        ``patient_index`` (the draw is made either way, so the rest of the episode's
        randomness does not depend on the choice).

        Raises:
            ValueError: for an unknown reset option or an index outside the pool.
        """
        index = int(rng.integers(len(self.patients)))
        options = dict(options or {})
        unknown = sorted(set(options) - {"patient_index"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; allowed: ['patient_index']")
        chosen = options.get("patient_index")
        if chosen is None:
            return index
        if isinstance(chosen, bool) or not isinstance(chosen, (int, np.integer)):
            raise ValueError(f"patient index must be an integer, got {chosen!r}")
        if not 0 <= chosen < len(self.patients):
            raise ValueError(f"patient index must be in [0, {len(self.patients)}), got {chosen}")
        return int(chosen)

    def __repr__(self) -> str:
        return f"PatientPool({self.source}, {[p.name for p in self.patients]})"


@cache
def _phantom(seed: int) -> Patient:
    from sonoray.assets.phantom import make_phantom

    return make_phantom(seed)


@cache
def _ct(path: str, labels: str | None, spacing_mm: float | None) -> Patient:
    from sonoray.assets.ct import load_ct, load_example_ct

    folder = Path(path)
    if folder.is_dir() and (folder / "ct.nii.gz").is_file():
        if labels is None:
            return load_example_ct(folder, spacing_mm=spacing_mm)
        return load_ct(folder / "ct.nii.gz", labels=labels, spacing_mm=spacing_mm, name=folder.name)
    if not Path(path).exists():
        raise FileNotFoundError(f"CT {path!r} does not exist")
    return load_ct(path, labels=labels, spacing_mm=spacing_mm)

"""Tissue spring under the probe face and the admittance controller that regulates its force.

The tissue is a Kelvin-Voigt (spring and damper) Winkler foundation sampled at the
probe's elements: element ``i`` indented by ``d_i`` mm at rate ``v_i`` mm/s pushes back with
``f_i = max(0, k d_i + c v_i) / N`` for ``d_i > 0`` and nothing otherwise, and the probe
force is the sum over the ``N`` elements. So a face pressed uniformly ``d`` mm into the skin
feels ``k d`` (the stiffness ``k`` is that of the whole face), and a face half off the skin
feels half of it. The indentations come from ray tests against the skin mesh
(:mod:`sonoray.envs.probe_arm`), not from PyBullet's contact points, which come and go
between steps.

The controller is an admittance law along the probe axis: each control period it moves
the probe by ``(F_target - F_elastic) / k_c``, the virtual damping scheduled on ``k_c``, the
tangent stiffness of the tissue model over the elements now in contact. It acts on the
elastic part of the force, the force the probe holds once it stops; the damper adds a
transient while the probe moves, which counts towards the peak force (and so towards the
safety cap) but fades when the probe is still. Each move is clipped to ``max_step_mm`` per
period (an axial speed limit), to the step's travel budget and to the indentation at which
the spring alone would reach the force cap. Off the skin it first closes the measured gap.

Main reference: the spring-damper tissue models reviewed by Famaey & Vander Sloten, "Soft
tissue modelling for applications in virtual surgery and surgical robotics", Comput.
Methods Biomech. Biomed. Eng. 11 (2008); force numbers from robotic ultrasound studies
(see ``FORCE_DEFAULTS``).

Limitations: linear in indentation (real tissue stiffens, roughly exponentially); no
lateral (shear or friction) forces and no torque; the tissue surface does not deform
around the probe, so neighbouring elements do not drag each other down; the damping is a
tuning default, not a measured value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Defaults of the contact model, each with its source.
FORCE_DEFAULTS: dict[str, tuple[float, str]] = {
    "stiffness_n_per_mm": (
        1.0,
        "order of magnitude of abdominal indentation stiffness under a probe-sized face "
        "(sonoray design default, approx.)",
    ),
    "damping_n_s_per_mm": (
        0.01,
        "tuning default (approx.): Kelvin-Voigt time constant c / k = 10 ms; no single "
        "published value",
    ),
    "target_force_n": (5.0, "contact force commonly targeted in robotic ultrasound studies"),
    "min_target_force_n": (2.0, "lower end of the allowed targets, around the 5 N norm (approx.)"),
    "max_target_force_n": (10.0, "upper end of the allowed targets, half the cap (approx.)"),
    "force_cap_n": (20.0, "conservative safety limit; abdominal forces up to about 34.5 N"),
}


def _default(name: str) -> float:
    return FORCE_DEFAULTS[name][0]


def _finite_number(name: str, value: float) -> float:
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


@dataclass(frozen=True)
class TissueSpring:
    """Kelvin-Voigt Winkler foundation under the probe elements.

    Attributes:
        stiffness_n_per_mm: Force per mm of uniform indentation of the whole face (> 0).
        damping_n_s_per_mm: Force per mm/s of uniform indentation rate (>= 0).
    """

    stiffness_n_per_mm: float = _default("stiffness_n_per_mm")
    damping_n_s_per_mm: float = _default("damping_n_s_per_mm")

    def __post_init__(self) -> None:
        k = _finite_number("stiffness_n_per_mm", self.stiffness_n_per_mm)
        c = _finite_number("damping_n_s_per_mm", self.damping_n_s_per_mm)
        if k <= 0.0:
            raise ValueError(f"stiffness_n_per_mm must be > 0, got {k}")
        if c < 0.0:
            raise ValueError(f"damping_n_s_per_mm must be >= 0, got {c}")

    def element_forces_n(
        self, indentation_mm: np.ndarray, previous_mm: np.ndarray | None = None, period_s=1.0
    ) -> np.ndarray:
        """Force of each element (N).

        Args:
            indentation_mm: ``(N,)`` indentation per element (mm; > 0 below the skin surface,
                ``-inf`` where no surface was found).
            previous_mm: ``(N,)`` indentation one control period earlier, for the damper;
                ``None`` for a static reading.
            period_s: Length of that control period (s).

        Returns:
            ``(N,)`` force per element, each >= 0 (tissue pushes, never pulls).
        """
        depth_mm = np.maximum(indentation_mm, 0.0)
        force = self.stiffness_n_per_mm * depth_mm
        if previous_mm is not None and self.damping_n_s_per_mm > 0.0:
            rate_mm_s = (depth_mm - np.maximum(previous_mm, 0.0)) / period_s
            force = force + self.damping_n_s_per_mm * rate_mm_s
        return np.where(depth_mm > 0.0, np.maximum(force, 0.0), 0.0) / depth_mm.shape[-1]

    def force_n(
        self, indentation_mm: np.ndarray, previous_mm: np.ndarray | None = None, period_s=1.0
    ) -> float:
        """Total force along the probe axis (N); arguments as :meth:`element_forces_n`."""
        return float(self.element_forces_n(indentation_mm, previous_mm, period_s).sum())

    def max_indentation_mm(self, force_cap_n: float) -> float:
        """Deepest any element may go: the spring alone reaches ``force_cap_n`` there even
        with the whole face that deep."""
        return float(force_cap_n) / self.stiffness_n_per_mm

    def contact_stiffness_n_per_mm(self, indentation_mm: np.ndarray) -> float:
        """Tangent stiffness of the elastic force against an axial move (N/mm)."""
        return float(np.mean(indentation_mm > 0.0)) * self.stiffness_n_per_mm


@dataclass(frozen=True)
class Regulation:
    """What one admittance run did.

    Attributes:
        offset_mm: Axial move it asks for (mm, + into the tissue), relative to the input pose.
        indentation_mm: ``(N,)`` per-element indentation after the move (mm).
        force_n: Elastic force after the move (N): what the probe holds once still.
        peak_force_n: Largest force over the control periods (N), damper included.
        iterations: Control periods used.
        converged: Whether ``|force_n - target| <= tolerance``.
    """

    offset_mm: float
    indentation_mm: np.ndarray
    force_n: float
    peak_force_n: float
    iterations: int
    converged: bool


@dataclass
class AdmittanceController:
    """Force regulation along the probe axis.

    Attributes:
        target_force_n: Contact force to hold (N), within ``force_range_n``.
        force_cap_n: Force at which contact counts as a safety violation (N).
        force_range_n: Allowed targets (N).
        tolerance_n: Force error at which a run stops (N).
        max_iterations: Control periods per run.
        control_period_s: Length of one control period (s), for the tissue damper.
        max_step_mm: Largest axial move in one control period (mm).
        contact_approach_mm: How far past first touch an approach from free space goes (mm).
    """

    target_force_n: float = _default("target_force_n")
    force_cap_n: float = _default("force_cap_n")
    force_range_n: tuple[float, float] = field(
        default=(_default("min_target_force_n"), _default("max_target_force_n"))
    )
    tolerance_n: float = 0.1
    max_iterations: int = 8
    control_period_s: float = 0.02
    max_step_mm: float = 5.0
    contact_approach_mm: float = 0.2

    def __post_init__(self) -> None:
        low, high = (_finite_number("force_range_n", v) for v in self.force_range_n)
        cap = _finite_number("force_cap_n", self.force_cap_n)
        if not 0.0 < low <= high < cap:
            raise ValueError(
                f"need 0 < force_range_n[0] <= force_range_n[1] < force_cap_n, got "
                f"force_range_n={self.force_range_n}, force_cap_n={cap}"
            )
        for name in ("tolerance_n", "control_period_s", "max_step_mm", "contact_approach_mm"):
            if _finite_number(name, getattr(self, name)) <= 0.0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if int(self.max_iterations) < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        self.set_target(self.target_force_n)

    def set_target(self, target_force_n: float) -> None:
        """Change the force to hold.

        Raises:
            ValueError: if the target is not a number within ``force_range_n``.
        """
        target = float(target_force_n)
        low, high = self.force_range_n
        if not low <= target <= high:
            raise ValueError(f"target_force_n must be within [{low}, {high}] N, got {target}")
        self.target_force_n = target

    def regulate(
        self,
        indentation_mm: np.ndarray,
        previous_mm: np.ndarray,
        spring: TissueSpring,
        max_travel_mm: float,
    ) -> Regulation:
        """Run the admittance law from a pose with the given per-element indentation.

        A pure axial move by ``s`` mm shifts every element's indentation by ``s`` (the rays
        run along the probe axis), so the loop needs no new ray tests.

        Args:
            indentation_mm: ``(N,)`` indentation at the start pose (mm, ``-inf`` = no surface
                within ray range). The start pose itself counts as the first control period.
            previous_mm: ``(N,)`` indentation one control period before the start.
            spring: Tissue model.
            max_travel_mm: Largest total axial move (mm); must not exceed the rays' reach
                below the face, so an approach cannot overshoot unseen skin.

        Returns:
            The :class:`Regulation`; ``offset_mm`` keeps every element at or above
            ``spring.max_indentation_mm(force_cap_n)`` below the surface.
        """
        start_mm = np.asarray(indentation_mm, dtype=np.float64)
        period_s = self.control_period_s
        deepest_mm = float(start_mm.max())
        touching = np.isfinite(deepest_mm)
        high_mm = max_travel_mm
        if touching:
            high_mm = min(high_mm, spring.max_indentation_mm(self.force_cap_n) - deepest_mm)
        low_mm = -max_travel_mm

        offset_mm = 0.0
        force_n = spring.force_n(start_mm)
        peak_n = spring.force_n(start_mm, previous_mm, period_s)
        iterations = 0
        while touching and abs(force_n - self.target_force_n) > self.tolerance_n:
            if iterations == self.max_iterations:
                break
            now_mm = start_mm + offset_mm
            if force_n <= 0.0:
                # Free space: close the smallest gap, then press a little.
                step_mm = self.contact_approach_mm - (deepest_mm + offset_mm)
            else:
                step_mm = (self.target_force_n - force_n) / spring.contact_stiffness_n_per_mm(
                    now_mm
                )
            step_mm = float(np.clip(step_mm, -self.max_step_mm, self.max_step_mm))
            new_offset_mm = float(np.clip(offset_mm + step_mm, low_mm, high_mm))
            if new_offset_mm == offset_mm:
                break
            offset_mm = new_offset_mm
            force_n = spring.force_n(start_mm + offset_mm)
            peak_n = max(peak_n, spring.force_n(start_mm + offset_mm, now_mm, period_s))
            iterations += 1

        if not touching:
            # Nothing within ray range: descend the whole budget (the rays saw that far).
            offset_mm = max_travel_mm
        return Regulation(
            offset_mm=offset_mm,
            indentation_mm=start_mm + offset_mm,
            force_n=force_n,
            peak_force_n=peak_n,
            iterations=iterations,
            converged=abs(force_n - self.target_force_n) <= self.tolerance_n,
        )

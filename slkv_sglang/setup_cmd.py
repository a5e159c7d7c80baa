"""``slkv setup``: make this machine ready to run the engine (idempotent)."""

from __future__ import annotations

import argparse
import logging

from .kernel_shim import pth_path, write_pth_if_needed
from .model import ensure_bundled_model

logger = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slkv setup", description=__doc__)
    parser.parse_args(argv)
    if write_pth_if_needed():
        logger.info("sgl_kernel does not import here; installed the import stand-in at %s", pth_path())
    else:
        logger.info("sgl_kernel imports; no stand-in needed")
    logger.info("bundled model ready at %s", ensure_bundled_model())
    return 0

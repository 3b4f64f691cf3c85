"""Command-line parsing shared by every stage: ``--config F`` and repeatable ``--set key=value``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Callable

from retrieval_core.config import Config, ConfigError, load_config


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config file or fsspec URL (default: built-in defaults = configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set model.batch_size=64 (repeatable; value parsed as YAML)")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return load_config(args.config, args.overrides)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")


# Errors a job reports as one line (exit status 1): bad input or settings, incompatible or missing outputs.
JOB_ERRORS = (FileNotFoundError, FileExistsError, ValueError, RuntimeError)


def run_job(description: str, run: Callable[[Config], Any], describe: Callable[[Any], str],
            argv: list[str] | None = None) -> int:
    """The ``main`` of a stage: parse ``--config`` / ``--set``, run, print ``describe(result)``; 1 on errors."""
    args = parser(description).parse_args(argv)
    cfg = config_from_args(args)
    try:
        result = run(cfg)
    except JOB_ERRORS as exc:
        logging.getLogger("jobs").error("%s", exc)
        return 1
    print(describe(result))
    return 0

"""Helpers shared by CLI subcommands: config arguments and local multi-process launch."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """CONFIG (YAML) plus ``section.field=value`` overrides (CLI > file > defaults)."""
    parser.add_argument("config", nargs=None if required else "?", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides, e.g. train.micro_batch_size=2 parallel.tp=2")


def split_config_and_overrides(args) -> tuple[str | None, list[str]]:
    """argparse cannot tell an optional CONFIG from a first override; an argument with '=' is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        overrides.insert(0, config)
        config = None
    return config, overrides

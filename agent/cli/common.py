"""Shared helpers of the CLI commands: configuration loading and output."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from agent import config as config_mod
from agent.config import Config


def load_config(ctx: typer.Context, override: str | None = None) -> tuple[Config, str]:
    path = override or (ctx.obj or {}).get("config") if ctx else override
    return config_mod.load(path)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def msg(text: str) -> None:
    """A message for the human (stderr), never data."""
    print(text, file=sys.stderr, flush=True)

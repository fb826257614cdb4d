"""A producer's bearer token: from the environment or a file, never from the command line.

Every user of a machine can read every process's arguments (`ps`), and producers run with
tokens that live for weeks.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_token_options(parser: argparse.ArgumentParser, *, env: str, scope: str) -> None:
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help=f"a file holding the bearer token ({scope}); default: the variable ${env}",
    )


def read_token(parser: argparse.ArgumentParser, args: argparse.Namespace, *, env: str) -> str:
    """The token from `--token-file`, else from `env`; empty when neither gives one."""
    path: Path | None = args.token_file
    if path is None:
        return os.environ.get(env, "").strip()
    try:
        return path.read_text().strip()
    except OSError as exc:
        parser.error(f"--token-file {path}: {exc.strerror or exc}")

"""The ``medrobust`` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> module path; each module defines ``add_parser(subparsers)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, str] = {
    "evaluate": "medrobust.cli.evaluate",
    "train": "medrobust.cli.train",
    "attack": "medrobust.cli.attack",
    "demo": "medrobust.cli.demo",
    "tamper": "medrobust.cli.tamper",
}


class CLIError(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


def _register() -> dict[str, object]:
    modules: dict[str, object] = {}
    for name, path in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(path)
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="medrobust",
        description="Adversarial robustness for medical-imaging models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = _register()
    for module in modules.values():
        module.add_parser(sub)  # type: ignore[attr-defined]
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args))  # type: ignore[attr-defined]
    except CLIError as err:
        print(f"medrobust {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

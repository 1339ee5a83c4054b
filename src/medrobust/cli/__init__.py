"""The ``medrobust`` command. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence
from typing import Any

# name -> module path; each module defines ``add_parser(subparsers)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, str] = {
    "evaluate": "medrobust.cli.evaluate",
    "train": "medrobust.cli.train",
    "attack": "medrobust.cli.attack",
    "demo": "medrobust.cli.demo",
    "tamper": "medrobust.cli.tamper",
    "transfer": "medrobust.cli.transfer",
}


class CLIError(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless the text already states it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.required
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


# Python argument names in messages from library code, and the flags that say the same thing
_FLAG_WORDING = (
    (r"\(--trust-code on the command line, trust_code=True in Python\)", "(--trust-code)"),
    (r"\boverwrite=True\b", "--overwrite"),
    (r"\bpass overwrite\b", "use --overwrite"),
    (r"\bwith overwrite\b", "with --overwrite"),
    (r"\buse overwrite\b", "use --overwrite"),
    (r"\btrust_code=True\b", "--trust-code"),
)


def cli_wording(message: str) -> str:
    """``message`` with the Python argument names it mentions replaced by the CLI flags."""
    for pattern, flag in _FLAG_WORDING:
        message = re.sub(pattern, flag, message)
    return message


DISTRIBUTED_COMMANDS = ("evaluate", "train", "transfer")
"""Subcommands that split their work across the ranks of a torchrun launch."""


def attack_names() -> str:
    """The registered attack names, comma-separated (for help texts)."""
    from medrobust.attacks import ATTACKS

    return ", ".join(sorted(ATTACKS))


def _register() -> dict[str, object]:
    modules: dict[str, object] = {}
    for name, path in SUBCOMMANDS.items():
        modules[name] = importlib.import_module(path)
    return modules


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    from medrobust import __version__

    names = attack_names()
    parser = argparse.ArgumentParser(
        prog="medrobust",
        description="Adversarial robustness for medical-imaging models.",
        epilog=f"attacks: {names}",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medrobust {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = _register()
    for module in modules.values():
        p: Any = module.add_parser(sub)  # type: ignore[attr-defined]
        p.formatter_class = HelpFormatter
        if p.prog.split()[-1] in ("attack", "evaluate"):
            p.epilog = (p.epilog + "\n\n" if p.epilog else "") + f"attacks: {names}"
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from medrobust import distributed, progress

    quiet = bool(getattr(args, "quiet", False) or getattr(args, "no_progress", False))
    try:
        # under torchrun: join the process group (gloo on CPUs, nccl on GPUs per local rank)
        dctx = distributed.init(getattr(args, "device", None))
    except distributed.DistributedError as err:
        print(f"medrobust {args.command}: error: {err}", file=sys.stderr)
        return 2
    if dctx is not None and args.command not in DISTRIBUTED_COMMANDS:
        print(f"medrobust {args.command}: error: this command runs in one process; under "
              f"torchrun use one of {', '.join(DISTRIBUTED_COMMANDS)}", file=sys.stderr)
        distributed.shutdown()
        return 2
    try:
        with progress.shown(not quiet and (dctx is None or dctx.is_main)):
            return int(modules[args.command].run(args))  # type: ignore[attr-defined]
    except (CLIError, distributed.DistributedError) as err:
        where = "" if dctx is None else f" (rank {dctx.rank})"
        print(f"medrobust {args.command}{where}: error: {cli_wording(str(err))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

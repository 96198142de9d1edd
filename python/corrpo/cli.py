"""The ``corrpo`` command: a dispatcher over subcommands (``corrpo fingerprint ...``,
``corrpo models``).

Errors of input or settings (corrpo's own ``CorrpoError``, a missing file) end the command
with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .fingerprinting import cli as fingerprint_cli

    # allow_abbrev=False: a misspelled flag is refused, not read as the one it prefixes.
    parser = argparse.ArgumentParser(prog="corrpo", description="corrpo command-line tools", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands = {"fingerprint": fingerprint_cli.add_parser(sub), "models": _models_parser(sub)}
    return parser, commands


MODELS_DESCRIPTION = """\
The real models that PyPI packages carry as GGUF files (corrpo.models.PACKAGES), which any
--model (corrpo fingerprint, corrpo-server serve) takes by name:

  corrpo models            each package's model file, or the command that installs it
  corrpo models smollm2    that model file's path alone (for tools that read GGUF files)"""


def _models_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "models",
        help="the model packages: where their GGUF files are, or how to install them",
        description=MODELS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("name", nargs="?", help="a model package (default: list them all)")
    return p


def _models(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .models import PACKAGES, package_model

    if args.name:
        print(package_model(args.name))  # a missing package is a ConfigError with its install command
        return 0
    width = max(map(len, PACKAGES))
    for name in PACKAGES:
        try:
            where = str(package_model(name))
        except ConfigError as err:  # not installed: the message ends with the command that installs it
            where = str(err)
        print(f"{name:<{width}}  {where}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import CorrpoError

    parser, commands = build_parser()
    args = parser.parse_args(argv)
    sub = commands[args.command]
    try:
        if args.command == "fingerprint":
            from .fingerprinting import cli as fingerprint_cli

            return fingerprint_cli.run(args, sub)
        if args.command == "models":
            return _models(args)
    except CorrpoError as err:
        print(f"corrpo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"corrpo {args.command}: error: {err} (in the corrpo checkout: pip install '.[gradients]')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"corrpo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

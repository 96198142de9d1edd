"""The ``corrpo`` command: a dispatcher over subcommands (``corrpo fingerprint ...``).

Errors of input or settings (corrpo's own ``CorrpoError``, a missing file) end the command
with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .fingerprinting import cli as fingerprint_cli

    # allow_abbrev=False: a misspelled flag is refused, not read as the one it prefixes.
    parser = argparse.ArgumentParser(prog="corrpo", description="corrpo command-line tools", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands = {"fingerprint": fingerprint_cli.add_parser(sub)}
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    from .errors import CorrpoError

    parser, commands = build_parser()
    args = parser.parse_args(argv)
    sub = commands[args.command]
    try:
        if args.command == "fingerprint":
            from .fingerprinting import cli as fingerprint_cli

            return fingerprint_cli.run(args, sub)
    except CorrpoError as err:
        print(f"corrpo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ImportError as err:
        print(f"corrpo {args.command}: error: {err} (pip install 'corrpo[gradients]')", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"corrpo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())

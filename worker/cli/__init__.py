"""The ``foundry`` command line. Each module in this package that defines ``register(subparsers)``
adds its subcommands; one that defines ``register_audit(audit_subparsers)`` adds ``foundry audit ...`` views."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("foundry")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry", description="Foundry: model-operations jobs for an LLM code-review service")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"foundry {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
               if not m.name.startswith("_")]
    for module in modules:
        if hasattr(module, "register"):
            module.register(sub)
    audit = sub.add_parser("audit", help="audit queries over the ledger")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="VIEW", required=True)
    for module in modules:
        if hasattr(module, "register_audit"):
            module.register_audit(audit_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from domain import versions

        versions.require(versions.CLIENT)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, LookupError, RuntimeError, OSError) as exc:
        from rich.console import Console

        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())

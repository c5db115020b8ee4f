"""The ``foundry`` command line. Each module in this package that defines ``register(subparsers)``
adds its subcommands; one that defines ``register_audit(audit_subparsers)`` adds ``foundry audit ...`` views.

Conventions (tests/unit/test_cli_conventions.py): every read command takes ``--json`` (one JSON document on
standard output); the tenant is always ``--tenant``; exit status 0 success, 1 runtime error (unknown job,
unreachable broker, a ledger without tables, a job that did not succeed), 2 usage error (a bad option or
value); known failures print one ``error:`` line, no traceback (``-v`` adds it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

# Commands that run without an existing ledger (they create it, or do not use it).
NO_LEDGER_NEEDED = {"db", "demo", "prepare-model", "worker", "beat", "flower", "schema", "health", "metrics", "rank-agent"}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("foundry")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foundry", description="Foundry: model-operations jobs for an LLM code-review service",
                                     epilog="exit status: 0 success, 1 runtime error, 2 usage error")
    parser.add_argument("--version", action="version", version=f"foundry {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks on errors")
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
    from worker.cli._common import (
        CliError,
        UsageError,
        err_console,
        ledger_problem,
        missing_ledger,
    )

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for a usage error, 0 for --help/--version
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from domain import versions

        versions.require(versions.CLIENT)
        if args.command not in NO_LEDGER_NEEDED:
            missing_ledger()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - each known failure becomes one line and an exit status
        code, message = _classify(exc, CliError, UsageError, ledger_problem)
        if code is None or args.verbose:
            if code is None:
                raise
            logging.getLogger("foundry").exception("details")
        err_console.print(f"[red]error:[/red] {message}", markup=True, highlight=False)
        return code


def _classify(exc: Exception, CliError, UsageError, ledger_problem) -> tuple[int | None, str]:
    """(exit status, message) for a known failure; (None, "") for a bug, which keeps its traceback."""
    from domain.errors import InvalidJob

    ledger = ledger_problem(exc)
    if ledger:
        return 1, ledger
    if isinstance(exc, CliError):
        return exc.code, str(exc)
    if isinstance(exc, (UsageError, InvalidJob)):
        return 2, str(exc)
    if isinstance(exc, (LookupError, RuntimeError, OSError, TimeoutError)):
        return 1, str(exc)
    if isinstance(exc, ValueError):  # a value given on the command line that the domain refused
        return 2, str(exc)
    from sqlalchemy.exc import SQLAlchemyError

    if isinstance(exc, SQLAlchemyError):
        return 1, f"ledger error: {exc.__class__.__name__}: {str(exc).splitlines()[0]}"
    return None, ""


if __name__ == "__main__":
    sys.exit(main())

"""Every command the demo suggests is one the CLI accepts."""

from __future__ import annotations

import shlex

from worker.cli import build_parser
from worker.cli.demo import HINTS


def test_every_demo_hint_parses():
    parser = build_parser()
    for hint in HINTS:
        argv = shlex.split(hint.format(tenant="demo"))
        assert argv[0] == "foundry"
        args = parser.parse_args(argv[1:])  # argparse exits (SystemExit) on an invalid command
        assert callable(args.func), hint

"""foundry flower: Celery's Flower dashboard on Foundry's broker, always behind basic auth.

The credentials come from FLOWER_BASIC_AUTH (``user:password``, several separated by commas) or from the file
FLOWER_BASIC_AUTH_FILE names (compose secrets), and reach Flower through its own FLOWER_BASIC_AUTH environment
variable, never the command line (which any local user can read in the process list).
"""

from __future__ import annotations

import os
import sys


def register(sub) -> None:
    p = sub.add_parser("flower", help="run Flower behind basic auth (FLOWER_BASIC_AUTH or FLOWER_BASIC_AUTH_FILE)")
    p.add_argument("--port", type=int, default=5555, help="TCP port (default 5555)")
    p.add_argument("--address", default="0.0.0.0", help="address to listen on (default all interfaces)")
    p.add_argument("--purge-offline-after", type=int, default=300, metavar="SECONDS",
                   help="drop workers offline this long from the dashboard (default 300 s)")
    p.set_defaults(func=cmd_flower)


def flower_argv(port: int, address: str, purge_offline_after: int) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "flower", f"--port={port}",
            f"--address={address}", f"--purge_offline_workers={purge_offline_after}"]


def cmd_flower(args) -> int:
    from domain.secrets import secret

    auth = secret("FLOWER_BASIC_AUTH")
    if not auth or any(":" not in pair for pair in auth.split(",")):
        raise RuntimeError("set FLOWER_BASIC_AUTH or FLOWER_BASIC_AUTH_FILE to user:password "
                           "(Flower has no authentication of its own)")
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH_FILE"} | {"FLOWER_BASIC_AUTH": auth}
    os.execvpe(sys.executable, flower_argv(args.port, args.address, args.purge_offline_after), env)
    return 0

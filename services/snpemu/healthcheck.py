"""snpemu-healthcheck ADDRESS [SERVICE]: a real grpc.health.v1.Health/Check, for containers.

Exits 0 when the service reports SERVING, 1 otherwise. Arguments hold no spaces, so runtimes
that split a health-check command on spaces run it the same way.
"""

from __future__ import annotations

import sys

from snpemu.launcher.supervisor import grpc_health


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2 or args[0].startswith("-"):
        print("usage: snpemu-healthcheck HOST:PORT [SERVICE]", file=sys.stderr)
        return 2
    status = grpc_health(args[0], args[1] if len(args) == 2 else "", timeout=3.0)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())

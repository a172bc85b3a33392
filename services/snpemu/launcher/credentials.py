"""Credentials for a virtual host run by compose or Kubernetes, where the launcher does not
make them: a host credential, and each guest's VMM and owner credentials.

    python -m snpemu.launcher.credentials --guests 2 > .snpemu/compose.env   # compose
    python -m snpemu.launcher.credentials --guests 8 --dir creds/            # Kubernetes

The first prints compose variables (SNPEMU_HOST_CREDENTIAL, SNPEMU_GUEST_<N>_VMM_CREDENTIAL,
SNPEMU_GUEST_<N>_OWNER_CREDENTIAL) to pass with `docker compose --env-file .env --env-file
.snpemu/compose.env up`; the second writes host-credential and one file per guest credential
for `kubectl create secret generic` (docs/kubernetes.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from snpemu.runtime.credentials import new_secret, vmm_credential, write_secret


def make(guests: int, host: str | None = None) -> dict[str, str]:
    """Every credential of a host with `guests` guests, by file name."""
    host = host or new_secret()
    out = {"host-credential": host}
    for n in range(guests):
        name = f"guest-{n}"
        out[f"{name}.vmm-credential"] = vmm_credential(host, name)
        out[f"{name}.owner-credential"] = new_secret()
    return out


def as_env(creds: dict[str, str]) -> str:
    lines = [f"SNPEMU_HOST_CREDENTIAL={creds['host-credential']}"]
    for key, value in creds.items():
        if key != "host-credential":
            guest, kind = key.split(".")
            n = guest.split("-")[1]
            lines.append(f"SNPEMU_GUEST_{n}_{kind.replace('-', '_').upper()}={value}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m snpemu.launcher.credentials")
    p.add_argument("--guests", type=int, default=2, help="number of guests (default 2)")
    p.add_argument("--dir", type=Path, help="write one file per credential here (0600)")
    args = p.parse_args(argv)
    if not 0 <= args.guests <= 1024:
        p.error("--guests must be 0..1024")
    creds = make(args.guests)
    if args.dir is None:
        sys.stdout.write(as_env(creds))
        return 0
    args.dir.mkdir(parents=True, exist_ok=True)
    for name, secret in creds.items():
        write_secret(args.dir / name, secret)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

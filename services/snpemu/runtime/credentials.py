"""The credentials a caller presents, and the principal each one names.

Three kinds (docs/design.md#credentials):

- the host credential (x-snpemu-host-credential): root on the virtual host. The launcher
  draws it at random and gives it to the host services only.
- a VMM credential (the same header): what a guest agent's VMM side (QEMU's role) holds to
  open /dev/kvm and /dev/vhost-net, one per guest. It is `<guest>.<hex MAC>`, the MAC being
  HMAC-SHA256 under the host credential of the guest's name, so a host service checks it with
  the credential it already has and no VMM secret sits in any host service's environment; one
  guest's credential neither names nor opens another guest.
- an owner credential (x-snpemu-owner-credential): the guest owner's, for the guest agent's
  own API (reading guest memory, asking for reports). Random per guest; only that agent has it.

What a VMM credential opens is deliberately small (CreateVm, RegisterDevice and the calls on
what those returned); the VM and device handles' tokens are what protect one VM from another.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

HOST_HEADER = "x-snpemu-host-credential"
OWNER_HEADER = "x-snpemu-owner-credential"

_LABEL = b"snpemu vmm credential v1\0"
# a guest name as the launcher and compose spell it (guest-0, guest-1, ...); kept short so a
# forged header cannot make the check hash megabytes
_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")


def vmm_credential(host_credential: str, guest: str) -> str:
    """The VMM credential of `guest`, derived from the host credential."""
    if not _NAME.fullmatch(guest):
        raise ValueError(f"{guest[:64]!r} is not a guest name")
    mac = hmac.new(host_credential.encode(), _LABEL + guest.encode(), hashlib.sha256)
    return f"{guest}.{mac.hexdigest()}"


def vmm_principal(host_credential: str, given: str) -> str | None:
    """The guest whose VMM credential `given` is, or None if it is not a valid one."""
    name, dot, _mac = given.partition(".")
    if not dot or not _NAME.fullmatch(name):
        return None
    expected = vmm_credential(host_credential, name)
    return name if hmac.compare_digest(given.encode(), expected.encode()) else None


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def new_secret() -> str:
    return secrets.token_hex(32)


def owner_credential_file(state_dir: Path | str, guest: str) -> Path:
    """Where the launcher leaves `guest`'s owner credential (mode 0600)."""
    return Path(state_dir) / f"{guest}.owner-credential"


def read_owner_credential(state_dir: Path | str, guest: str) -> str:
    return owner_credential_file(state_dir, guest).read_text().strip()


def write_secret(path: Path, secret: str) -> None:
    """A secret file readable by its owner only, from the first byte on."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(secret)

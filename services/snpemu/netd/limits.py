"""What netd accepts from a caller before it looks anything up: handle ids, tokens, MACs, and
how much of a refused value an error message may quote.

A refused request must cost nothing: the value is checked for size first, and an error quotes
only a short prefix of it (a 1 MiB id echoed back would not fit the client's metadata limit).
"""

from __future__ import annotations

import string

from snpemu.abi import virtio
from snpemu.errors import InvalidArgument

# netd's device ids are 16 hex characters and kvm's VM ids a dozen more; anything longer was
# not issued by either
HANDLE_ID_MAX_CHARS = 64
# secrets.token_bytes(32), as kvm's VM token (snp/common/v1/handles.proto VmHandle.token)
DEVICE_TOKEN_BYTES = 32
VM_TOKEN_MAX_BYTES = 64
INPUT_QUOTE_CHARS = 64
# "02:00:00:00:00:01"
MAC_TEXT_CHARS = 17


def quote(value: str) -> str:
    """A caller's string as an error message may show it: at most a short prefix."""
    if len(value) <= INPUT_QUOTE_CHARS:
        return repr(value)
    return f"{value[:INPUT_QUOTE_CHARS]!r}... ({len(value)} characters)"


def check_id(what: str, value: str) -> None:
    if not value:
        raise InvalidArgument(f"{what} is required")
    if len(value) > HANDLE_ID_MAX_CHARS or not (value.isascii() and value.isprintable()):
        raise InvalidArgument(
            f"{what} {quote(value)} is not an id this host issued (at most "
            f"{HANDLE_ID_MAX_CHARS} printable ASCII characters)"
        )


def check_device_token(token: bytes) -> None:
    """Empty (a host call) or the size netd issues; whether it is the device's is decided
    against the device."""
    if token and len(token) != DEVICE_TOKEN_BYTES:
        raise InvalidArgument(
            f"device token has {len(token)} bytes; netd issues {DEVICE_TOKEN_BYTES}"
        )


def check_vm_token(token: bytes) -> None:
    """Only its size: kvm decides whether it is the VM's."""
    if len(token) > VM_TOKEN_MAX_BYTES:
        raise InvalidArgument(
            f"vm token has {len(token)} bytes; kvm issues at most {VM_TOKEN_MAX_BYTES}"
        )


def mac_bytes(mac: str) -> bytes:
    """A station address: six hex octets, unicast and not all zero.
    KERNEL: include/linux/etherdevice.h is_valid_ether_addr() (!multicast && !zero), which
    virtio_net's probe requires of the device's MAC."""
    if len(mac) != MAC_TEXT_CHARS:
        raise InvalidArgument(
            f"MAC {quote(mac)} is not six hex octets like 02:00:00:00:00:01 "
            f"({MAC_TEXT_CHARS} characters)"
        )
    if not all(c in string.hexdigits for c in mac.replace(":", "")):
        # int() would take "+1" or " 1" as an octet
        raise InvalidArgument(f"MAC {mac!r} is not six hex octets like 02:00:00:00:00:01")
    try:
        raw = virtio.mac_bytes(mac)
    except virtio.VirtioError as e:
        raise InvalidArgument(str(e)) from None
    if not any(raw):
        raise InvalidArgument(f"MAC {mac} is the all-zero address")
    return raw

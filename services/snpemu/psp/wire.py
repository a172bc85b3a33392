"""psp.proto's request fields decoded into what the firmware model takes, each checked first.

A request field mirrors a field of the command buffer (include/linux/psp-sev.h); a value that
field could not hold (an SPL above 255, an enum value the proto does not define) is refused
here with a PspReason, before the firmware sees the command. What the firmware itself checks
(a reserved bit, a TCB above the current one) it answers with its own status.
"""

from __future__ import annotations

from typing import Any

from snp.common.v1 import types_pb2

from snpemu.abi.addr import Spa
from snpemu.errors import InvalidArgument
from snpemu.psp.status import PspReason
from snpemu.psp.tcb import Tcb

U8_MAX = 0xFF
# The SNP_INIT_EX range list is one page: a u32 count, a u32 reserved, 16-byte entries.
# KERNEL: include/linux/psp-sev.h struct sev_data_range_list; drivers/crypto/ccp/sev-dev.c
# snp_filter_reserved_mem_regions() refuses a list that would not fit its page (-E2BIG).
MAX_RANGES = (4096 - 8) // 16


def tcb_pb(tcb: Tcb) -> types_pb2.TcbVersion:
    return types_pb2.TcbVersion(
        raw=tcb.raw, boot_loader=tcb.boot_loader, tee=tcb.tee, snp=tcb.snp, microcode=tcb.microcode
    )


def tcb_raw(msg: Any, field: str) -> int:
    """The TCB_VERSION u64 a TcbVersion names: its raw value, or, when raw is 0, the one its
    decoded fields build. Each SPL is one byte of the u64 (KERNEL: include/linux/psp-sev.h
    sev_snp_tcb_version_genoa_milan: boot_loader, tee, reserved[4], snp, microcode, all u8), so
    a field above 255 cannot be sent; Turin's fmc has no byte on Milan and Genoa; and a raw
    value given with fields must be the one they decode from."""
    parts = {
        "boot_loader": msg.boot_loader,
        "tee": msg.tee,
        "snp": msg.snp,
        "microcode": msg.microcode,
    }
    for name, value in parts.items():
        if value > U8_MAX:
            raise InvalidArgument(
                f"{field}.{name} is {value}: an SPL is one byte (0..255)",
                reason=PspReason.OUT_OF_RANGE,
            )
    if msg.fmc:
        raise InvalidArgument(
            f"{field}.fmc is Turin's; this chip's TCB_VERSION has no FMC byte",
            reason=PspReason.OUT_OF_RANGE,
        )
    built = Tcb(**parts).raw
    if not msg.raw:
        return built
    if any(parts.values()) and built != Tcb.from_raw(msg.raw).raw:
        raise InvalidArgument(
            f"{field}.raw {msg.raw:#018x} and its decoded fields disagree",
            reason=PspReason.TCB_MISMATCH,
        )
    return int(msg.raw)


def gctx(handle: Any) -> Spa:
    if not handle.gctx_paddr:
        raise InvalidArgument("gctx.gctx_paddr is required", reason=PspReason.MISSING_FIELD)
    return Spa(int(handle.gctx_paddr))


def size_2m(size: int) -> bool:
    if size not in (types_pb2.PAGE_SIZE_4K, types_pb2.PAGE_SIZE_2M):
        raise InvalidArgument(
            "page_size must be PAGE_SIZE_4K or PAGE_SIZE_2M",
            reason=PspReason.MISSING_FIELD if size == 0 else PspReason.UNKNOWN_ENUM_VALUE,
        )
    return size == types_pb2.PAGE_SIZE_2M


def defined(enum: Any, value: int, field: str) -> int:
    """value, one the proto enum (a generated enum wrapper) defines; UNSPECIFIED included, as
    the firmware judges that."""
    if value not in enum.values():
        raise InvalidArgument(
            f"{field} {value} is not one of {', '.join(enum.keys())}",
            reason=PspReason.UNKNOWN_ENUM_VALUE,
        )
    return value


def u8(value: int, field: str) -> int:
    if value > U8_MAX:
        raise InvalidArgument(
            f"{field} is {value}: the command buffer holds one byte",
            reason=PspReason.OUT_OF_RANGE,
        )
    return value


def at_most(length: int, limit: int, field: str) -> None:
    if length > limit:
        raise InvalidArgument(
            f"{field} is {length} long, at most {limit}", reason=PspReason.TOO_LONG
        )

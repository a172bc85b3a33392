"""rmp's session streams: many small accesses on one stream, each answered in order.

A session op runs through the same handler as its unary RPC; an error stays in-band as a
SessionError (the status the unary call would have had) and the stream goes on, whatever the op
was: a field the handler refuses, an op the session does not know, or a bug (INTERNAL).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from snp.rmp.v1 import rmp_pb2 as pb

from snpemu.errors import InvalidArgument, SnpemuError
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.wire import session_error

log = logging.getLogger(__name__)

# A kernel path between two guest entries is a handful of accesses (rmp.proto HostSequenceRequest).
MAX_SEQUENCE = 8

Handler = Callable[[Any, Any], Awaitable[Any]]


async def run_session(
    requests: AsyncIterator[Any],
    context: Any,
    response_cls: Callable[..., Any],
    handlers: Mapping[str, Handler],
) -> AsyncIterator[Any]:
    """Run each op of a session stream through its unary handler; errors stay in-band."""
    async for op in requests:
        which = op.WhichOneof("op")
        try:
            if which not in handlers:
                raise InvalidArgument(
                    f"a session request is one of {', '.join(handlers)}",
                    reason=RmpReason.UNKNOWN_SESSION_OP,
                )
            yield response_cls(**{which: await handlers[which](getattr(op, which), context)})
        except SnpemuError as e:
            yield response_cls(error=session_error(e))
        except Exception:
            # A bug, not the caller's doing: logged (one line, the runtime's JSON format), and
            # answered as INTERNAL so that the stream and the caller's other ops go on.
            log.exception("session op %s failed", which, extra={"event": "session_op_failed"})
            yield response_cls(error=session_error(SnpemuError(f"internal error in {which}")))


async def host_sequence(
    request: Any, context: Any, handlers: Mapping[str, Handler]
) -> pb.HostSequenceResponse:
    """A kernel path's accesses in order, up to the first that fails (see rmp.proto)."""
    if not 0 < len(request.ops) <= MAX_SEQUENCE:
        raise InvalidArgument(
            f"a sequence has 1 to {MAX_SEQUENCE} ops", reason=RmpReason.OUT_OF_RANGE
        )
    kinds = [op.WhichOneof("op") for op in request.ops]
    if any(k not in handlers for k in kinds):
        raise InvalidArgument(
            f"each op of a sequence is one of {', '.join(handlers)}",
            reason=RmpReason.UNKNOWN_SESSION_OP,
        )
    results = []
    for op, kind in zip(request.ops, kinds, strict=True):
        try:
            result = await handlers[kind](getattr(op, kind), context)
        except SnpemuError as e:
            results.append(pb.HostSessionResponse(error=session_error(e)))
            break
        results.append(pb.HostSessionResponse(**{kind: result}))
        if kind == "rmp_update_batch" and any(result.codes):
            break
    return pb.HostSequenceResponse(results=results)

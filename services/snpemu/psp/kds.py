"""An HTTP endpoint with AMD KDS's URL shapes, so tools fetch the emulated chain by changing
their KDS base URL. SPEC: AMD 57230 chapter 4; go-sev-guest kds/kds.go (docs/abi.md#kds)

    GET /vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..  -> VCEK, DER
    GET /vcek/v1/{product}/cert_chain                                        -> ASK then ARK, PEM
    GET /vcek/v1/{product}/crl                                               -> CRL, DER

kds_query.py checks a request (and says which status a bad one gets) before anything is derived;
the VCEKs come from the identity's bounded cache (vcek_cache.py). Whatever goes wrong while a
request is served ends as one JSON log line (runtime/logs.py), never a traceback on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding

from snpemu.psp import kds_query
from snpemu.psp.identity import ChipIdentity
from snpemu.psp.kds_query import BadQuery, What

log = logging.getLogger(__name__)

# a client gone mid-answer is its own business, not psp's fault
_HANG_UPS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


def _handler(identity: ChipIdentity) -> type[BaseHTTPRequestHandler]:
    product = identity.product.name

    class Kds(BaseHTTPRequestHandler):
        timeout = 30  # seconds a connection may idle: a silent client holds no thread forever

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("kds: " + fmt, *args)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            try:
                self._answer()
            except _HANG_UPS:
                self.close_connection = True
            except Exception:
                log.exception("KDS request failed", extra={"target": kds_query.quote(self.path)})
                self.close_connection = True
                # the answer may be under way already, or the client gone
                with contextlib.suppress(OSError, ValueError):
                    self._send(500, b"internal error\n", "text/plain")

        def _answer(self) -> None:
            try:
                query = kds_query.parse(self.path, product, identity.chip_id)
            except BadQuery as e:
                self._send(e.status, f"{e}\n".encode(), "text/plain")
                return
            if query.what == What.CERT_CHAIN:
                pem = identity.ask_cert.public_bytes(Encoding.PEM)
                pem += identity.ark_cert.public_bytes(Encoding.PEM)
                self._send(200, pem, "application/x-pem-file")
            elif query.what == What.CRL:
                self._send(200, identity.crl_der(), "application/pkix-crl")
            else:
                assert query.tcb is not None  # INVARIANT: kds_query gives a VCEK query its TCB
                self._send(200, identity.vcek_der(query.tcb), "application/x-x509-ca-cert")

    return Kds


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver prints a traceback to stderr here: log one line instead."""
        e = sys.exc_info()[1]
        if isinstance(e, _HANG_UPS):
            log.debug("KDS client hung up", extra={"client": str(client_address), "error": str(e)})
            return
        log.error("KDS connection failed", exc_info=True, extra={"client": str(client_address)})


class KdsServer:
    def __init__(self, identity: ChipIdentity, bind: str, port: int) -> None:
        self.identity, self.bind, self.requested_port = identity, bind, port
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.httpd = _Server((self.bind, self.requested_port), _handler(self.identity))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="kds")
        self.thread.start()

    def stop(self) -> None:
        if self.httpd is not None and self.thread is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.httpd = None

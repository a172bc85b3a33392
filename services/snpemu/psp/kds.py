"""An HTTP endpoint with AMD KDS's URL shapes, so tools fetch the emulated chain by changing
their KDS base URL. SPEC: go-sev-guest kds/kds.go (docs/abi.md#kds)

    GET /vcek/v1/{product}/{hwid}?blSPL=..&teeSPL=..&snpSPL=..&ucodeSPL=..  -> VCEK, DER
    GET /vcek/v1/{product}/cert_chain                                        -> ASK then ARK, PEM
    GET /vcek/v1/{product}/crl                                               -> CRL, DER
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives.serialization import Encoding

from snpemu.psp.identity import ChipIdentity
from snpemu.psp.tcb import Tcb

log = logging.getLogger(__name__)


def _handler(identity: ChipIdentity) -> type[BaseHTTPRequestHandler]:
    product = identity.product.name

    class Kds(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: object) -> None:
            log.debug("kds: " + fmt, *args)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[:2] != ["vcek", "v1"] or parts[2] != product:
                self._send(
                    404,
                    f"not found (this KDS serves /vcek/v1/{product}/...)\n".encode(),
                    "text/plain",
                )
                return
            what = parts[3]
            if what == "cert_chain":
                pem = identity.ask_cert.public_bytes(Encoding.PEM)
                pem += identity.ark_cert.public_bytes(Encoding.PEM)
                self._send(200, pem, "application/x-pem-file")
            elif what == "crl":
                self._send(200, identity.crl().public_bytes(Encoding.DER), "application/pkix-crl")
            else:
                self._vcek(what, urllib.parse.parse_qs(url.query))

        def _vcek(self, hwid: str, query: dict[str, list[str]]) -> None:
            if hwid.lower() != identity.chip_id.hex():
                self._send(404, b"unknown hwid\n", "text/plain")
                return
            try:
                spl = {k: int(query[k][0]) for k in ("blSPL", "teeSPL", "snpSPL", "ucodeSPL")}
            except (KeyError, ValueError):
                self._send(400, b"blSPL, teeSPL, snpSPL and ucodeSPL are required\n", "text/plain")
                return
            if any(not 0 <= v <= 255 for v in spl.values()):
                self._send(400, b"SPLs are 0..255\n", "text/plain")
                return
            tcb = Tcb(spl["blSPL"], spl["teeSPL"], spl["snpSPL"], spl["ucodeSPL"])
            cert = identity.vcek_cert(tcb)
            self._send(200, cert.public_bytes(Encoding.DER), "application/x-x509-ca-cert")

    return Kds


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
        self.httpd = ThreadingHTTPServer((self.bind, self.requested_port), _handler(self.identity))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="kds")
        self.thread.start()

    def stop(self) -> None:
        if self.httpd is not None and self.thread is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=5)
            self.httpd = None

"""The bootstrap every snpemu service runs: grpc.aio on uvloop, health, reflection, metrics.

Life of a service process:
  1. config from the environment, checked (a bad value exits 2 with the variable named);
  2. gRPC server bound with SO_REUSEPORT off, so a busy port fails loudly instead of
     silently sharing traffic with another process;
  3. health NOT_SERVING, metrics HTTP endpoint up, server started, start-up work run;
  4. health SERVING for "" and the service name;
  5. on SIGTERM/SIGINT: health NOT_SERVING (enter_graceful_shutdown), then in-flight RPCs get
     SNPEMU_SHUTDOWN_GRACE_S to finish, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import uvloop
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, start_http_server

from snpemu.hostconfig import ConfigError
from snpemu.runtime import logs
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.host_epoch import EXIT_HOST_REBOOTED, follow_host
from snpemu.runtime.metrics import GrpcServerMetrics, rpc_type
from snpemu.runtime.reflection_pool import ReflectionPool
from snpemu.runtime.servicer import DEFAULT_REQUEST_LIMIT, Authority, build_handler

log = logging.getLogger(__name__)

SERVER_OPTIONS = [
    # A second process binding the same port must fail, not share it (STYLE: traps).
    ("grpc.so_reuseport", 0),
]


class StartupError(RuntimeError):
    """The service could not start (busy port, failed start-up work)."""


T = TypeVar("T")


def _itself(impl: Any) -> Sequence[object]:
    return () if impl is None else (impl,)


def _nothing(_runtime: ServiceRuntime) -> Any:
    return None


@dataclass
class ServiceSpec(Generic[T]):
    """What a service brings to the shared bootstrap, generic in its implementation type T
    (the object holding the model, its servicers and its peers)."""

    name: str  # rmp, psp, kvm, netd, guest
    descriptor: ServiceDescriptor
    # Builds the implementation from the runtime (config, metrics registry, health);
    # by default nothing is built.
    make_impl: Callable[[ServiceRuntime], T] = _nothing
    # The objects whose `async def Method(request, context)` serve the RPCs, searched in
    # order (by default the implementation itself); an RPC none of them has answers
    # UNIMPLEMENTED (NOT_BUILT).
    servicers: Callable[[T], Sequence[object]] = _itself
    # Which RPCs only the host may call (guest agents never hold the host credential).
    host_only: Callable[[str], bool] = lambda _name: True
    # Host-only RPCs that a guest's VMM side may also call with its VMM credential.
    vmm_rpcs: frozenset[str] = frozenset()
    # Whether the service keeps state about memory and so starts over when the host reboots
    # (rmp restarts: runtime/host_epoch.py).
    follows_host: bool = False
    # Largest request per RPC, in bytes, where it is not DEFAULT_REQUEST_LIMIT.
    request_limits: Mapping[str, int] = field(default_factory=dict)
    # Service-specific settings from the environment, checked at start like ServiceConfig
    # (a ConfigError exits 2 naming the variable).
    options: Callable[[Mapping[str, str]], Any] = lambda _env: None
    # Start-up work done before health turns SERVING (e.g. kvm's host bring-up).
    startup: Callable[[T], Awaitable[None]] | None = None
    shutdown: Callable[[T], Awaitable[None]] | None = None
    extra_services: list[str] = field(default_factory=list)


class ServiceRuntime:
    """One running service: usable in-process (tests, port 0) and by `run_service`."""

    def __init__(
        self,
        spec: ServiceSpec[Any],
        config: ServiceConfig,
        options: Any = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        """`interceptors` run after the metrics one: a test's fault injection, in-process."""
        self.spec = spec
        self.interceptors = list(interceptors)
        self.config = config
        self.options = options if options is not None else spec.options({})
        self.registry = CollectorRegistry()
        self.metrics = GrpcServerMetrics(self.registry)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.impl: Any = None
        self.grpc_port = 0
        self.metrics_port = 0
        self._metrics_http: Any = None
        # set when rmp restarted under a service that follows the host: it must start over
        self.host_rebooted = asyncio.Event()
        self.host_boot = ""  # rmp's boot id when this service first asked
        self._epoch: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{self.config.bind}:{self.grpc_port}"

    async def start(self) -> None:
        spec, config = self.spec, self.config
        service_names = [
            spec.descriptor.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
            *spec.extra_services,
        ]
        self.impl = spec.make_impl(self)
        # grpc's transport limit is the largest of the per-RPC ones, which the handler
        # enforces itself with a clear error (runtime/servicer.py _deserializer)
        largest = max([DEFAULT_REQUEST_LIMIT, *spec.request_limits.values()])
        server = grpc.aio.server(
            interceptors=[self.metrics.interceptor(), *self.interceptors],
            options=[*SERVER_OPTIONS, ("grpc.max_receive_message_length", largest)],
        )
        handler = build_handler(
            spec.name,
            spec.descriptor,
            spec.servicers(self.impl),
            authority=Authority(
                host_credential=config.host_credential,
                vmm_rpcs=spec.vmm_rpcs,
                host_only=spec.host_only,
                owner_credential=config.owner_credential,
            ),
            request_limits=spec.request_limits,
        )
        server.add_generic_rpc_handlers((handler,))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(service_names, server, pool=ReflectionPool())
        for name in ("", spec.descriptor.full_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.initialise(self._all_methods())

        try:
            self.grpc_port = server.add_insecure_port(f"{config.bind}:{config.grpc_port}")
        except RuntimeError as e:
            raise StartupError(
                f"cannot listen for gRPC on {config.bind}:{config.grpc_port}: {e} "
                "(is another process using the port?)"
            ) from e
        if self.grpc_port == 0:
            raise StartupError(f"cannot listen for gRPC on {config.bind}:{config.grpc_port}")
        try:
            self._metrics_http = start_http_server(
                config.metrics_port, addr=config.bind, registry=self.registry
            )
        except OSError as e:
            raise StartupError(
                f"cannot listen for metrics on {config.bind}:{config.metrics_port}: {e}"
            ) from e
        self.metrics_port = self._metrics_http[0].server_port
        self.server = server
        await server.start()
        if spec.startup is not None:
            await spec.startup(self.impl)
        if spec.follows_host:
            self._epoch = asyncio.ensure_future(
                follow_host(
                    config.peers["rmp"],
                    config.host_credential,
                    self.host_rebooted.set,
                    interval=config.host_poll_s,
                    booted=self._booted,
                )
            )
        for name in ("", spec.descriptor.full_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_serving(self, serving: bool) -> None:
        """The service's health as it is (a service recovering from a peer's crash is
        NOT_SERVING until it has), for the whole server and its service name."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", self.spec.descriptor.full_name):
            await self.health.set(name, status)

    def _booted(self, boot_id: str) -> None:
        self.host_boot = boot_id

    def _all_methods(self) -> list[tuple[str, str, str]]:
        services = [
            self.spec.descriptor,
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
        ]
        return [
            (rpc_type(m.client_streaming, m.server_streaming), s.full_name, m.name)
            for s in services
            for m in s.methods
        ]

    async def stop(self) -> None:
        if self._epoch is not None:
            self._epoch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._epoch
            self._epoch = None
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(self.config.shutdown_grace_s)
        if self.spec.shutdown is not None:
            await self.spec.shutdown(self.impl)
        if self._metrics_http is not None:
            httpd, thread = self._metrics_http
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
            self._metrics_http = None


async def _serve(spec: ServiceSpec[Any], config: ServiceConfig, options: Any) -> int:
    runtime = ServiceRuntime(spec, config, options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runtime.start()
    except StartupError as e:
        log.error(str(e), extra={"event": "startup_failed"})
        await runtime.stop()
        return 1
    log.info(
        "serving",
        extra={
            "event": "serving",
            "grpc_address": runtime.address,
            "grpc_port": runtime.grpc_port,
            "metrics_port": runtime.metrics_port,
            "service_name": spec.descriptor.full_name,
        },
    )
    stopping = asyncio.ensure_future(stop.wait())
    rebooted = asyncio.ensure_future(runtime.host_rebooted.wait())
    await asyncio.wait((stopping, rebooted), return_when=asyncio.FIRST_COMPLETED)
    for waiter in (stopping, rebooted):
        waiter.cancel()
    log.info("stopping", extra={"event": "stopping", "grace_s": config.shutdown_grace_s})
    await runtime.stop()
    log.info("stopped", extra={"event": "stopped"})
    return EXIT_HOST_REBOOTED if runtime.host_rebooted.is_set() else 0


def run_service(spec: ServiceSpec[Any], argv: list[str] | None = None) -> None:
    """Entry point of `python -m snpemu.<service>`; exits the process."""
    del argv  # configuration comes from the environment only
    try:
        config = ServiceConfig.from_env(spec.name)
        options = spec.options(os.environ)
    except ConfigError as e:
        logs.configure(spec.name, spec.name)
        log.error(f"bad configuration: {e.message}", extra={"event": "bad_config"})
        sys.exit(2)
    logs.configure(spec.name, config.instance, config.log_level)
    sys.exit(uvloop.run(_serve(spec, config, options)))

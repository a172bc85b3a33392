"""snpemu launcher: start the virtual host as local processes.

    python -m snpemu.launcher up       # start, wait until healthy, supervise; Ctrl-C stops
    python -m snpemu.launcher status   # health of every service of a running host
    python -m snpemu.launcher lab      # the RMP-policy lab, each run on a fresh virtual host
    python -m snpemu.launcher top      # a kvm_stat-like live view of a running host

Ports come from `.env` (overridable by environment variables); state (logs, psp data,
Prometheus data, launcher.json) goes to SNPEMU_STATE_DIR, default ./.snpemu.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from snpemu.hostconfig import HOST_COMPONENTS, ConfigError, HostConfig
from snpemu.launcher import prometheus
from snpemu.launcher.plan import ProcessSpec, plan, service_name_of
from snpemu.launcher.supervisor import Child, LaunchError, Supervisor, grpc_health, http_ready
from snpemu.runtime.credentials import new_secret, owner_credential_file, write_secret

log = logging.getLogger("snpemu")


class _Stop(Exception):
    """Raised in the main thread by SIGINT/SIGTERM."""


def state_dir() -> Path:
    return Path(os.environ.get("SNPEMU_STATE_DIR") or ".snpemu").resolve()


def _grpc_child(spec: ProcessSpec, logs: Path) -> Child:
    address = f"127.0.0.1:{spec.endpoint.grpc_port}"
    service = spec.service_name
    return Child(
        name=spec.name,
        argv=spec.argv,
        env=spec.env,
        log_path=logs / f"{spec.name}.log",
        ready=lambda: grpc_health(address, service) == "SERVING",
    )


def _prometheus_child(config: HostConfig, state: Path) -> Child | None:
    binary = os.environ.get("SNPEMU_PROMETHEUS_BIN") or shutil.which("prometheus")
    if not binary:
        return None
    home = state / "prometheus"
    home.mkdir(parents=True, exist_ok=True)
    config_file = home / "prometheus.yml"
    rules = prometheus.install_rules(home)
    if not rules:
        log.warning("no alert rules at %s: Prometheus runs without them", prometheus.RULES_SOURCE)
    config_file.write_text(
        prometheus.render(config.endpoints, lambda _e: "127.0.0.1", rule_files=rules)
    )
    port = config.prometheus_port
    return Child(
        name="prometheus",
        argv=(
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1d",
        ),
        env={},
        log_path=state / "logs" / "prometheus.log",
        ready=lambda: http_ready(f"http://127.0.0.1:{port}/-/ready"),
    )


def _write_state(path: Path, config: HostConfig, sup: Supervisor) -> None:
    endpoints = {e.name: e for e in config.endpoints}
    data = {
        "launcher_pid": os.getpid(),
        "children": [
            {
                "name": c.name,
                "pid": c.pid,
                "pids": c.pids,
                "restarts": c.restarts,
                "log": str(c.log_path),
                **(
                    {
                        "grpc": f"127.0.0.1:{endpoints[c.name].grpc_port}",
                        "metrics": f"http://127.0.0.1:{endpoints[c.name].metrics_port}/metrics",
                    }
                    if c.name in endpoints
                    else {"url": f"http://127.0.0.1:{config.prometheus_port}"}
                ),
            }
            for c in sup.running
        ],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _grpcurl_command() -> str:
    """How the user should type grpcurl: from PATH, else the one in this virtualenv."""
    if shutil.which("grpcurl"):
        return "grpcurl"
    beside = Path(sys.executable).parent / "grpcurl"
    if not beside.exists():
        return "grpcurl"
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def _banner(config: HostConfig, sup: Supervisor, state: Path, why_no_prometheus: str) -> str:
    rows = [f"  {'service':<10} {'gRPC':<17} {'metrics':<31} log"]
    for e in config.endpoints:
        rows.append(
            f"  {e.name:<10} 127.0.0.1:{e.grpc_port:<7} "
            f"{f'http://127.0.0.1:{e.metrics_port}/metrics':<31} "
            f"{os.path.relpath(state / 'logs' / (e.name + '.log'))}"
        )
    rows.append(f"  {'psp KDS':<10} http://127.0.0.1:{config.kds_port}/vcek/v1/<product>/...")
    if any(c.name == "prometheus" for c in sup.running):
        rows.append(f"  {'prometheus':<10} http://127.0.0.1:{config.prometheus_port}")
    else:
        rows.append(f"  prometheus not started ({why_no_prometheus})")
    rmp, kvm = config.endpoint("rmp"), config.endpoint("kvm")
    guest = config.guests[0] if config.guests else kvm
    g = _grpcurl_command()
    tries = [
        f"{g} -plaintext 127.0.0.1:{rmp.grpc_port} list",
        f"{g} -plaintext 127.0.0.1:{kvm.grpc_port} describe snp.kvm.v1.KvmService",
        f'{g} -plaintext -d \'{{"service":"snp.rmp.v1.RmpService"}}\' '
        f"127.0.0.1:{rmp.grpc_port} grpc.health.v1.Health/Check",
        f"{g} -plaintext 127.0.0.1:{guest.grpc_port} list",
    ]
    return "\n".join(
        [
            f"snpemu virtual host is up: {len(config.endpoints)} services (state in "
            f"{os.path.relpath(state)}/)",
            "",
            *rows,
            "",
            "Try:",
            *(f"  {t}" for t in tries),
            "",
            "Ctrl-C (or SIGTERM) stops everything.",
        ]
    )


def _load_config() -> HostConfig | None:
    try:
        return HostConfig.load()
    except ConfigError as e:
        print(f"snpemu: bad configuration: {e.message}", file=sys.stderr)
        return None


def cmd_up(args: argparse.Namespace) -> int:
    config = _load_config()
    if config is None:
        return 2
    state = state_dir()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    credential = new_secret()
    write_secret(state / "host-credential", credential)

    owners = {e.name: new_secret() for e in config.endpoints if e.name not in HOST_COMPONENTS}
    for name, secret in owners.items():
        write_secret(owner_credential_file(state, name), secret)
    specs = plan(config, state_dir=state, host_credential=credential, owner_credentials=owners)
    children = {s.name: _grpc_child(s, state / "logs") for s in specs}
    groups: list[list[Child]] = [[children[s.name]] for s in specs if s.is_host_side]
    groups.append([children[s.name] for s in specs if not s.is_host_side])
    prom = None if args.no_prometheus else _prometheus_child(config, state)
    # rmp is the host's memory: its restart is a host reboot
    sup = Supervisor(reboot_on=frozenset({"rmp"}))

    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    state_file = state / "launcher.json"
    code = 0
    try:
        sup.start_all(args.ready_timeout, [g for g in groups if g])
        why_no_prometheus = (
            "--no-prometheus given"
            if args.no_prometheus
            else "no `prometheus` binary; make install adds it"
        )
        if prom is not None:
            # Monitoring is optional: a busy port (say, a system Prometheus on 9090) must
            # not keep the virtual host from starting.
            failure = sup.start_optional(prom, args.ready_timeout)
            if failure:
                log.warning("Prometheus did not start: %s", failure)
                why_no_prometheus = (
                    f"it failed to start, see {os.path.relpath(prom.log_path)}; "
                    "is SNPEMU_PROMETHEUS_PORT free?"
                )
        _write_state(state_file, config, sup)
        print(_banner(config, sup, state, why_no_prometheus), flush=True)
        restarts = 0
        while True:
            sup.poll()
            total = sum(c.restarts for c in sup.running)
            if total != restarts:
                restarts = total
                _write_state(state_file, config, sup)
            time.sleep(0.2)
    except _Stop as e:
        log.info("%s received: stopping every service", e)
    except LaunchError as e:
        log.error("start-up failed: %s", e)
        code = 1
    finally:
        stopping = True
        sup.stop_all()
        state_file.unlink(missing_ok=True)
        log.info("stopped")
    return code


def cmd_status(_args: argparse.Namespace) -> int:
    state_file = state_dir() / "launcher.json"
    try:
        data = json.loads(state_file.read_text())
    except FileNotFoundError:
        print(f"snpemu: not running (no {state_file})")
        return 3
    worst = 0
    for child in data["children"]:
        if "grpc" in child:
            status = grpc_health(child["grpc"], service_name_of(child["name"]))
            where = child["grpc"]
        else:
            status = "SERVING" if http_ready(child["url"] + "/-/ready") else "UNREACHABLE"
            where = child["url"]
        worst = worst or (status != "SERVING")
        print(f"{child['name']:<10} {where:<22} {status:<12} restarts={child['restarts']}")
    return 1 if worst else 0


def cmd_prometheus_config(args: argparse.Namespace) -> int:
    config = _load_config()
    if config is None:
        return 2
    if args.compose:
        text = prometheus.render(
            config.endpoints, lambda e: e.name, rule_files=prometheus.RULE_FILES
        )
    else:
        text = prometheus.render(config.endpoints, lambda _e: "127.0.0.1")
    sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="snpemu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("up", help="start the virtual host and supervise it")
    up.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus")
    up.add_argument("--ready-timeout", type=float, default=30.0, help="seconds per service")
    sub.add_parser("status", help="health of a running virtual host")
    prom = sub.add_parser(
        "prometheus-config", help="print the Prometheus scrape config for this host layout"
    )
    prom.add_argument(
        "--compose", action="store_true", help="targets by compose service name (deploy/)"
    )
    sub.add_parser(
        "lab",
        help="the RMP-policy lab (python -m snpemu.lab --help for its options)",
        add_help=False,
    )
    sub.add_parser("top", help="a kvm_stat-like live view (snpemu top --help)", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lab"]:
        from snpemu.lab.__main__ import main as lab_main

        return lab_main(argv[1:])
    if argv[:1] == ["top"]:
        from snpemu.launcher.top import main as top_main

        return top_main(argv[1:])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="snpemu: %(message)s", stream=sys.stdout)
    if args.command in (None, "up"):
        if args.command is None:
            args = up.parse_args([])
        return cmd_up(args)
    if args.command == "prometheus-config":
        return cmd_prometheus_config(args)
    return cmd_status(args)


if __name__ == "__main__":
    sys.exit(main())

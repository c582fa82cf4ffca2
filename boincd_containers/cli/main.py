"""`boincd-containers`: serve | ctl ... | install. Heavy imports happen only in `serve`,
so `ctl` starts fast."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boincd-containers", description="Run BOINC tasks in containers."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--socket", help="Unix socket to serve on (BOINCD_SOCKET)")
    serve.add_argument("--state-dir", dest="state_dir", help="state directory (BOINCD_STATE_DIR)")
    serve.add_argument("--config", help="TOML config file (BOINCD_CONFIG)")
    serve.add_argument("--docker-host", dest="docker_host", help="engine URL (DOCKER_HOST)")
    serve.add_argument("--socket-group", dest="socket_group", help="group owning the socket")
    serve.add_argument("--log-level", dest="log_level", help="debug, info, warning, error")

    ctl = commands.add_parser("ctl", help="inspect and control a running daemon")
    ctl.add_argument("--socket", help="daemon socket (BOINCD_SOCKET)")
    verbs = ctl.add_subparsers(dest="verb", required=True)
    for verb, text in (
        ("status", "tasks, images, disk, GPUs and engine at a glance"),
        ("tasks", "task containers"),
        ("images", "image cache and disk accounting"),
        ("gpus", "GPU devices and shares"),
        ("gc", "run garbage collection now"),
        ("doctor", "platform checks and advice"),
    ):
        sub = verbs.add_parser(verb, help=text)
        sub.add_argument("--json", action="store_true", help="one JSON object on stdout")
        # Also after the verb (`ctl status --socket X`), as people type it. SUPPRESS:
        # when not given here, the value given before the verb (or None) stays.
        sub.add_argument(
            "--socket", default=argparse.SUPPRESS, help="daemon socket (BOINCD_SOCKET)"
        )
        if verb == "gc":
            sub.add_argument("--dry-run", action="store_true", help="report, remove nothing")

    install = commands.add_parser("install", help="install the boot-time service")
    install.add_argument("--dry-run", action="store_true", help="say what would be done")
    install.add_argument(
        "--rootless", action="store_true", help="run as the BOINC user with rootless Podman"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "ctl":
        from boincd_containers.cli import ctl

        return ctl.run(args)
    if args.command == "install":
        from boincd_containers.cli import install

        return install.main(dry_run=args.dry_run, rootless=args.rootless)
    return 2


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from boincd_containers.core.errors import BoincdError
    from boincd_containers.core.log import configure_logging
    from boincd_containers.core.settings import load_settings
    from boincd_containers.daemon.server import run

    try:
        settings = load_settings(vars(args))
    except BoincdError as exc:
        print(f"boincd-containers: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_json)
    try:
        asyncio.run(run(settings))
    except BoincdError as exc:
        print(f"boincd-containers: {exc.message}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"boincd-containers: permission denied: {exc.filename or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

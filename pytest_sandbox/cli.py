"""The ``pytest-sandbox`` command: ``ls``, ``reap``, ``doctor``, ``image build``, ``bundle serve``.

Exit codes: 0 ok, 1 findings (resources found or released, a check that failed), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_sandbox.errors import SandboxError, SettingsError
from pytest_sandbox.runtime import host
from pytest_sandbox.runtime.ledger import Ledger
from pytest_sandbox.runtime.reaper import owner_is_dead, sweep

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
SWEEPERS = ("pytest_sandbox.containers.engine:sweep_orphans",)


def _state_dir(args: argparse.Namespace) -> Path:
    from pytest_sandbox.settings import default_state_dir

    if args.state_dir:
        return Path(args.state_dir)
    env = os.environ.get("PYTEST_SANDBOX_STATE_DIR")
    return Path(env) if env else default_state_dir()


def cmd_ls(args: argparse.Namespace) -> int:
    ledger = Ledger.in_state_dir(_state_dir(args))
    rows = ledger.rows(run_id=args.run)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "kind": r.kind,
                        "key": r.key,
                        "run_id": r.run_id,
                        "worker": r.worker,
                        "nodeid": r.nodeid,
                        "created_at": r.created_at,
                        "kept": r.kept,
                        "owner": r.owner.to_dict(),
                        "owner_alive": not owner_is_dead(r.owner),
                        "details": r.details,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return EXIT_OK
    if not rows:
        print("no live resources")
        return EXIT_OK
    for r in rows:
        age = time.time() - r.created_at
        state = "kept" if r.kept else ("owner dead" if owner_is_dead(r.owner) else "live")
        print(
            f"{r.id:>5}  {r.kind:<10} {state:<10} {age:7.0f}s  run {r.run_id} {r.worker:<6} "
            f"{r.key}  [{r.nodeid or '-'}]"
        )
    return EXIT_OK


def cmd_reap(args: argparse.Namespace) -> int:
    ledger = Ledger.in_state_dir(_state_dir(args))
    report = sweep(
        ledger,
        only_run=args.run,
        include_kept=args.kept,
        dry_run=args.dry_run,
        sweepers=SWEEPERS,
    )
    verb = "would release" if args.dry_run else "released"
    for line in report.released:
        print(f"{verb}: {line}")
    for line in report.failed:
        print(f"failed: {line}", file=sys.stderr)
    if not report.released and not report.failed:
        print("nothing to reap")
        return EXIT_OK
    return EXIT_FINDINGS


def _doctor_checks(state_dir: Path) -> dict[str, dict[str, Any]]:
    engine = host.docker_engine()
    abi = host.landlock_abi()
    checks: dict[str, dict[str, Any]] = {
        "docker": {"ok": engine.version is not None, "detail": engine.describe()},
        "landlock": {
            "ok": abi > 0,
            "detail": f"ABI {abi}" + (" (fs + TCP rules)" if abi >= 4 else "")
            if abi
            else "not available (kernel too old, or disabled)",
        },
    }
    for name, argv in (
        ("bubblewrap", ["bwrap", "--version"]),
        ("sshd", ["sshd", "-V"]),
        ("git", ["git", "--version"]),
        ("busybox", ["busybox", "--help"]),
    ):
        version = host.tool_version(argv[0], argv[1:])
        checks[name] = {"ok": version is not None, "detail": version or "not installed"}
    try:
        from pytest_sandbox.settings import _check_state_dir

        _check_state_dir(state_dir, "doctor")
        checks["state_dir"] = {"ok": True, "detail": f"{state_dir} (writable)"}
    except (SettingsError, ImportError) as exc:
        checks["state_dir"] = {"ok": False, "detail": str(exc)}
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = _doctor_checks(_state_dir(args))
    if args.json:
        print(json.dumps(checks, indent=2))
    else:
        for name, check in checks.items():
            mark = "ok  " if check["ok"] else "MISS"
            print(f"{mark} {name:<11} {check['detail']}")
    return EXIT_OK if all(c["ok"] for c in checks.values()) else EXIT_FINDINGS


def cmd_image_build(args: argparse.Namespace) -> int:
    from pytest_sandbox.containers import images

    print(images.build_image(args.name, state_dir=_state_dir(args)))
    return EXIT_OK


def cmd_bundle_serve(args: argparse.Namespace) -> int:
    from pytest_sandbox.bundles import server

    return server.serve_dir(Path(args.dir), host=args.host, port=args.port, api_key=args.api_key)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pytest-sandbox", description="Inspect and clean up pytest-sandbox resources."
    )
    parser.add_argument("--state-dir", help="state dir (default: as the plugin resolves it)")
    sub = parser.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("ls", help="list live resources")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--run", help="only this run id")
    ls.set_defaults(func=cmd_ls)

    reap = sub.add_parser("reap", help="release resources whose owner is dead")
    reap.add_argument("--dry-run", action="store_true", help="list, release nothing")
    reap.add_argument("--kept", action="store_true", help="also release kept resources")
    reap.add_argument("--run", help="only this run id")
    reap.set_defaults(func=cmd_reap)

    doctor = sub.add_parser("doctor", help="what works on this machine")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=cmd_doctor)

    image = sub.add_parser("image", help="container images")
    image_sub = image.add_subparsers(dest="image_command", required=True)
    build = image_sub.add_parser("build", help="build a named image offline (busybox, debian-git)")
    build.add_argument("name")
    build.set_defaults(func=cmd_image_build)

    bundle = sub.add_parser("bundle", help="bundle server")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True)
    serve = bundle_sub.add_parser("serve", help="serve a directory of bundles over HTTP")
    serve.add_argument("dir")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", default="dev-key")
    serve.set_defaults(func=cmd_bundle_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code else EXIT_OK
    try:
        return int(args.func(args))
    except SandboxError as exc:
        print(f"pytest-sandbox: {exc}", file=sys.stderr)
        return EXIT_FINDINGS
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Helpers to serve a bundle tree with a real static server (nginx) for interop and benchmarks."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for servers that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def nginx_config(tree: Path, prefix: Path, port: int, api_key: str | None) -> Path:
    """Write an nginx config serving ``tree`` on 127.0.0.1:``port``; returns its path.

    ``tree`` is laid out like the URL space (``Tenant.export_tree``). With ``api_key`` the
    bundle API answers 403 to any other ``X-API-Key`` (401 when missing), like our server.
    Run it in the foreground: ``nginx -p PREFIX -c CONF -e PREFIX/error.log``.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    guard = ""
    if api_key is not None:
        guard = (
            'if ($http_x_api_key = "") { return 401; }\n'
            f'            if ($http_x_api_key != "{api_key}") {{ return 403; }}'
        )
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""
{user}
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {tree};
        location = /api/v1/memory/bundle/manifest {{
            default_type application/json;
            {guard}
        }}
        location /api/v1/memory/bundle/ {{
            {guard}
        }}
    }}
}}
"""
    )
    return conf


def nginx_argv(conf: Path, prefix: Path) -> list[str]:
    return ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]

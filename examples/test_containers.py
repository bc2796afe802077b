"""Downstream-style demo: a container with a data dir, snapshotted and restored."""

from __future__ import annotations


def test_preserve_and_restore_bot_memory(sandbox_container, sandbox_data_store):
    bot = sandbox_container(
        "busybox", command=["sh", "-c", "echo booted; exec sleep 600"], ready="booted"
    )
    bot.exec(["sh", "-c", "mkdir -p /data/memory && echo 'likes tea' > /data/memory/notes"])

    sandbox_data_store.preserve(bot, "bot-1")
    assert sandbox_data_store.has_preserved("bot-1")
    assert bot.status == "running"  # stopped for the export, then put back

    fresh = sandbox_container("busybox", command=["sleep", "600"])
    sandbox_data_store.restore(fresh, "bot-1")
    assert fresh.exec(["cat", "/data/memory/notes"]).output == b"likes tea\n"
    assert not sandbox_data_store.has_preserved("bot-1")


def test_http_service_ready_from_the_host(sandbox_container):
    web = sandbox_container(
        "busybox",
        command=[
            "sh",
            "-c",
            "mkdir -p /www && echo hi > /www/index.html && exec httpd -f -p 80 -h /www",
        ],
        ports=[80],
        ready=80,
    )
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{web.host_port(80)}/index.html") as response:
        assert response.read() == b"hi\n"

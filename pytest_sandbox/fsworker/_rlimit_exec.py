"""Trampoline for ``exec`` under limits: ``python -I -S _rlimit_exec.py CPU,AS,NOFILE ARGV...``.

Sets the rlimits on itself, then replaces itself with ARGV (no ``preexec_fn`` in the worker).
A 0 means no limit.
"""

import os
import resource
import sys


def main() -> None:
    cpu, space, files = (int(v) for v in sys.argv[1].split(","))
    for limit, value in (
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_AS, space),
        (resource.RLIMIT_NOFILE, files),
    ):
        if value:
            resource.setrlimit(limit, (value, value))
    argv = sys.argv[2:]
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"{argv[0]}: {exc.strerror}\n")
        os._exit(127)


main()

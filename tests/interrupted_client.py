"""A library program for tests/test_signals.py: Ctrl-C it while it waits for a remote child.

``python3 interrupted_client.py wait|run local|SSH_CONFIG``: starts ``sh -c 'echo $$;
exec sleep 100'`` (its pid reaches our stdout), then ``Popen.wait()`` (saying "waiting" first) or ``run()``.
When the KeyboardInterrupt comes it says whether the connection still answers and
whether the child still runs, kills the child, and prints what ``wait()`` returns.
"""

from __future__ import annotations

import os
import sys

import remowt

CHILD = ["sh", "-c", "echo $$; exec sleep 100"]


def connect(where: str) -> remowt.Remowt:
    if where == "local":
        return remowt.connect_local()
    return remowt.connect("remowt-test-host", ssh_config=where)


def main() -> None:
    how, where = sys.argv[1], sys.argv[2]
    with connect(where) as conn:
        process = None
        try:
            if how == "wait":
                process = conn.Popen(CHILD)
                # One write: the child's pid, copied to our stdout by another thread, may come before or after it,
                # never inside it (print writes the line and its end apart when unbuffered: PYTHONUNBUFFERED).
                os.write(1, b"waiting\n")
                process.wait()
            else:
                conn.run(CHILD)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        print(f"ping {conn.ping():.6f}", flush=True)
        if process is not None:
            print(f"running {process.poll() is None}", flush=True)
            process.kill()
            print(f"returncode {process.wait()}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    main()

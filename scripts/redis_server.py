"""Run the embedded Redis-compatible server in the foreground with AOF, for a local
setup without `rillflow dev`'s demo worker.

    python scripts/redis_server.py [--data-dir DIR] [--port 6390] [--fsync always]
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rillflow_runtime.embedded import EmbeddedRedis, dir_lock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Path.home() / ".rillflow" / "server")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--fsync", choices=["always", "everysec", "no"], default="everysec")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the server is stopped cleanly
    with dir_lock(a.data_dir):
        server = EmbeddedRedis(a.data_dir, port=a.port or None, appendonly=True, appendfsync=a.fsync).start()
        print(f"{server.url}  (AOF in {a.data_dir}, appendfsync {a.fsync}; Ctrl-C to stop)", flush=True)
        try:
            assert server.proc is not None
            server.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


if __name__ == "__main__":
    main()

"""``raypath s3``: serve a local folder as an S3 bucket (embedded moto endpoint).

For users without a bucket who want to exercise the S3 path on their own
slides: ``raypath s3 serve ./my_slides --bucket slides`` prints the endpoint
and the environment to export, then serves until interrupted.
"""

from __future__ import annotations

import argparse
import time


def serve(local_dir: str, bucket: str = "raypath", port: int = 9000, log_requests: bool = False) -> None:
    """Upload ``local_dir`` into an embedded S3 endpoint and serve it until Ctrl-C.

    Raises
    ------
    RaypathError
        ``bucket`` is not a name S3 accepts, ``local_dir`` is not a folder, or
        ``port`` is out of range or taken.
    """
    import os

    from raypath.errors import RaypathError
    from raypath.io.s3server import start_embedded_s3
    from raypath.io.storage import validate_bucket_name

    validate_bucket_name(bucket, "--bucket")
    if not os.path.isdir(local_dir):
        raise RaypathError(f"DIR {local_dir!r} is not a folder: pass the folder of slides to publish")
    if not 0 <= int(port) < 65536:
        raise RaypathError(f"--port {port} is not a TCP port: pass a number from 1 to 65535 (0 = any free port)")
    try:
        server = start_embedded_s3(port=port)
    except (OSError, SystemExit) as e:
        raise RaypathError(f"--port {port} cannot be used ({e}): pick another port") from None
    try:
        uri = server.upload_dir(local_dir, bucket)
        if log_requests:  # one line per request on stdout ("GET /bucket/key HTTP/1.1" 206)
            import logging
            import sys

            wz = logging.getLogger("werkzeug")
            wz.setLevel(logging.INFO)
            wz.addHandler(logging.StreamHandler(sys.stdout))
            wz.propagate = False
        print(f"serving {local_dir} as {uri} at {server.endpoint_url}")
        print("in another shell:")
        for k, v in server.environment().items():
            # dummy credentials of the embedded server, not secrets
            print(f"  export {k}={v}")
        print("stop with Ctrl-C (the endpoint is in memory: changes are not written back)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("s3", help="serve a local folder as an S3 bucket (embedded endpoint)")
    s3sub = p.add_subparsers(dest="s3_cmd", metavar="CMD")
    ps = s3sub.add_parser("serve", help="serve DIR as s3://BUCKET on 127.0.0.1:PORT")
    ps.add_argument("dir", help="local folder to publish")
    ps.add_argument("--bucket", default="raypath", metavar="NAME", help="bucket name it serves [default: raypath]")
    ps.add_argument("--port", type=int, default=9000, metavar="N", help="TCP port on 127.0.0.1 [default: 9000]")
    ps.add_argument("--log-requests", action="store_true", help="print one line per request on stdout")
    ps.set_defaults(func=lambda a: serve(a.dir, a.bucket, a.port, a.log_requests))
    p.set_defaults(func=lambda a: p.print_help() or 2)

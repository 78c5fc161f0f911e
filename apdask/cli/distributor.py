"""``apdask distributor``: serve, upload and list images."""

from __future__ import annotations

import argparse
import json
import os

from apdask.io.distributor import HttpDistributor
from apdask.services.distributor_server import run_server


def distributor_command(args: argparse.Namespace) -> int:
    if args.distributor_command == "serve":
        run_server(args.root, host=args.host, port=args.port)
        return 0

    dist = HttpDistributor(args.distributor)
    if args.distributor_command == "list":
        print(json.dumps(dist.index(), indent=1))
        return 0
    for path in args.files:
        rec = dist.put(os.path.basename(path), path)
        print(f"registered {rec['name']} ({rec['size']} bytes, sha256 {rec['sha256']})")
    return 0

"""torchrun whose store listens on ``--master-addr`` only.

torchrun's static rendezvous starts a ``TCPStore`` server on node 0 that
listens on every interface. Here node 0 starts that server first, on a
socket bound to ``--master-addr`` (loopback by default), as a multi-tenant
store: torchrun's own ``TCPStore`` on the same port in this process then
reuses it instead of opening another, and its workers connect to it as
clients. The arguments are torchrun's, unchanged.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--master-addr", default="127.0.0.1")
    known.add_argument("--master-port", type=int, default=29500)
    known.add_argument("--node-rank", type=int, default=0)
    args, _ = known.parse_known_args(argv)
    store = None
    if args.node_rank == 0:
        from torch.distributed import TCPStore

        from bagpipe.rendezvous import bound_listener

        listener = bound_listener(args.master_addr, args.master_port)
        store = TCPStore(args.master_addr, args.master_port, None, True, timedelta(seconds=900),
                         wait_for_workers=False, multi_tenant=True, master_listen_fd=listener.fileno(),
                         use_libuv=True)
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    finally:
        del store


if __name__ == "__main__":
    main()

"""The ``bagpipe`` command: a thin dispatcher to each subcommand's ``main(argv)``.

Subcommands import lazily so that ``bagpipe data ...`` does not pay for torch.
"""

from __future__ import annotations

import importlib
import sys

from bagpipe.config import ConfigError
from bagpipe.dataset import DatasetError

# subcommand -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("bagpipe.runner.job", "run a training job (servers, oracle, trainers) on this node"),
    "export": ("bagpipe.runner.export", "write the trained model of a run directory to a file"),
    "simulate": ("oracle.simulate", "count fetches and write-backs of each policy offline"),
    "oracle": ("oracle.process", "run the Oracle Cacher process (started by `run`)"),
    "oracle-worker": ("oracle.workers", "plan some of the oracle's partitions in a process of their own (started by `run`)"),
    "trainer": ("trainers.trainer", "run one trainer rank (started by `run` through torchrun)"),
    "check": ("bagpipe.runner.check", "check that cached training equals synchronous training"),
    "bench": ("bench.policies", "benchmark the policies side by side"),
    "servers": ("bagpipe.servers", "start redis-server shards and wait (for multi-node jobs)"),
    "keys": ("bagpipe.curve", "write CURVE key pairs that encrypt and authenticate the plan stream"),
}
DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("data.synth", "write synthetic Criteo or Avazu files in the real raw formats"),
    "prepare": ("data.prepare", "turn raw Criteo or Avazu files into Parquet"),
    "multi-hot": ("data.multihot", "make a prepared dataset multi-hot (bags of ids per table, as MLPerf's DLRM-DCNv2)"),
}


def _usage() -> str:
    lines = ["usage: bagpipe COMMAND [ARGS...]", "", "commands:"]
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<10} {text}")
    for name, (_, text) in DATA_COMMANDS.items():
        lines.append(f"  data {name:<5} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    table = COMMANDS
    if cmd == "data":
        if not rest or rest[0] not in DATA_COMMANDS:
            print(_usage(), file=sys.stderr)
            return 2
        table, cmd, rest = DATA_COMMANDS, rest[0], rest[1:]
    if cmd not in table:
        print(f"bagpipe: unknown command '{cmd}'\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(table[cmd][0])
    try:
        return int(module.main(rest) or 0)
    except (ConfigError, DatasetError) as exc:  # a bad key, value or path: one line, no traceback
        name = f"data {cmd}" if table is DATA_COMMANDS else cmd
        print(f"bagpipe {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bagpipe {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

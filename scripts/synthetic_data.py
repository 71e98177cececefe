"""What launch.sh synthesises for a config: its ``[synthetic_data]`` table as shell words.

Prints ``MULTI_HOT LENGTHS`` (``none fixed`` for one-hot data). A config for
multi-hot data says so, so that ``CONFIG=configs/X.toml ./launch.sh`` makes the
data it needs with no other variable:

    [synthetic_data]
    multi_hot = "mlperf"   # bag sizes for `bagpipe data multi-hot --bags`
    lengths = "fixed"      # or "uniform"
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def main(argv: list[str]) -> int:
    try:
        recipe = tomllib.loads(Path(argv[0]).read_text()).get("synthetic_data", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        print(f"launch.sh: cannot read {argv[0]}: {exc}", file=sys.stderr)
        return 2
    unknown = set(recipe) - {"multi_hot", "lengths"}
    if unknown:
        print(f"launch.sh: {argv[0]}: [synthetic_data] has unknown keys {sorted(unknown)} "
              "(known: multi_hot, lengths)", file=sys.stderr)
        return 2
    bags = str(recipe.get("multi_hot", "none")).replace(" ", "")
    print(bags or "none", recipe.get("lengths", "fixed"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

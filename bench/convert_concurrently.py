"""Run one `estargz-opt layer convert` per layer at once, as an image conversion does.

Usage: convert_concurrently.py FORMAT OUT_DIR CLI... -- SRC...
Prints a JSON list with each conversion's report, in SRC order; exits non-zero if any fails.
The caller measures this process tree as a whole (wall time, CPU, peak RSS).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    fmt, out_dir = argv[0], Path(argv[1])
    sep = argv.index("--")
    cli, sources = argv[2:sep], argv[sep + 1 :]
    procs = [
        subprocess.Popen(
            [*cli, "layer", "convert", src, str(out_dir / f"layer{i}.{fmt}"), "--format", fmt],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i, src in enumerate(sources)
    ]
    reports = []
    status = 0
    for p in procs:
        out, _ = p.communicate()
        status = status or p.returncode
        reports.append(json.loads(out) if p.returncode == 0 else None)
    print(json.dumps(reports))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The lite runtime as a bench worker: a process without torch, so that its peak RSS is
the runtime's own (`dfplan bench e2e` variants dfplan-lite*; bench/e2e.py drives it).

    python -m dfplan.lite.worker PACKED_DIR [--threads N] [--state-dtype fp32|bf16|fp16]

JSON lines: first it writes {"ok": info}; then for each request on stdin one answer.
  {"cmd": "sample", "ids": [...], "gen": G}  -> {"ok": [prefill_s, decode_s]}   (greedy, batch 1)
  {"cmd": "memory"}                          -> {"ok": {"peak_rss_bytes", "base_rss_bytes", ...}}
  {"cmd": "stop"}                            -> exits
Errors answer {"error": "..."}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _answer(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dfplan.lite.worker")
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--state-dtype", default=None)
    a = ap.parse_args(argv)
    from ..errors import DfplanError
    from ..prompting import proc_status_bytes
    from .model import LiteModel
    base = proc_status_bytes("VmRSS")
    t = time.perf_counter()
    try:
        m = LiteModel(a.path, state_dtype=a.state_dtype, threads=a.threads)
    except DfplanError as e:
        _answer({"error": str(e)})
        return 2
    _answer({"ok": {"model_bytes": int(m.manifest["payload_bytes"]), "load_s": time.perf_counter() - t,
                    "base_rss_bytes": base, "load_rss_bytes": proc_status_bytes("VmRSS") - base,
                    "state_dtype": m.state_dtype_name, "runtime": "lite"}})
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "sample":
            _answer({"ok": list(m.time_greedy(req["ids"], int(req["gen"])))})
        elif req["cmd"] == "memory":
            _answer({"ok": {"peak_rss_bytes": proc_status_bytes("VmHWM"), "base_rss_bytes": base,
                            "peak_gpu_bytes": None}})
        else:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

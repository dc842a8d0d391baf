"""What every benchmark records: versions, machine, threads; and the median/min/max summary."""
from __future__ import annotations

import os
import platform
import sys
import time

import numpy as np


def summarize(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=np.float64)
    return {"median_ms": float(np.median(a)), "min_ms": float(a.min()), "max_ms": float(a.max()), "n": int(a.size)}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _main_module() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else os.path.basename(sys.argv[0])


def environment(threads: int) -> dict:
    import onnxruntime as ort

    import kvcache_infer
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "-m", _main_module(), *sys.argv[1:]]),
        "python": sys.version.split()[0], "numpy": np.__version__, "onnxruntime": ort.__version__,
        "kvcache_infer": kvcache_infer.__version__, "platform": platform.platform(), "cpu": cpu_name(),
        "logical_cpus": os.cpu_count(), "intra_op_threads": threads, "inter_op_threads": 1,
    }


def session_options(threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None with a warning when matplotlib is missing: a
    benchmark writes its JSON first and its plots after, so a missing plotting library costs plots only."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed (pip install matplotlib): no plots; the results are in the JSON",
              file=sys.stderr)
        return None
    return plt


class Clock:
    """Seconds since construction; a workload's arrival times are on this clock."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def wait_until(self, t: float) -> None:
        d = t - self.now()
        if d > 0:
            time.sleep(d)

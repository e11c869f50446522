"""Build catalogs/workloads.csv (preset length quantiles) from the Azure 2023 traces.

Run from the repo root: python scripts/build_workloads.py ../shared/reference/traces
The product never reads the traces at run time; it reads the quantiles this writes.
"""

import csv
import sys
from pathlib import Path

import numpy as np

from thunderops.workload import load_trace

SOURCE = ("Azure/AzurePublicDataset AzureLLMInferenceTrace_{} (2023-11-16, CC-BY 4.0; "
          "Patel et al., Splitwise, ISCA 2024)")


def main(trace_dir: Path, out: Path) -> None:
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["workload", "kind", "rate_rps", "source", "as_of", *[f"p{i}" for i in range(101)]])
        for name, stem in (("coding", "code"), ("conversation", "conv")):
            wl = load_trace(trace_dir / f"AzureLLMInferenceTrace_{stem}.csv")
            for kind, values in (("prompt", wl.trace.prompt), ("output", wl.trace.output)):
                qs = np.percentile(values, np.arange(101))
                w.writerow([name, kind, f"{wl.rate:.4f}", SOURCE.format(stem), "2023-11-16",
                            *[f"{q:.1f}" for q in qs]])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path("catalogs/workloads.csv"))

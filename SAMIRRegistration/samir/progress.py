"""Progress of a registration on the console: one bar per stage, JSON lines, or nothing."""
from __future__ import annotations

import json
import sys
import time

PROGRESS_STYLES = ("bar", "json", "none")


class StageProgress:
    """One progress bar per stage on stderr (``bar``), JSON lines on stdout (``json``; what the Slicer
    module reads) or nothing. Called as ``progress(stage, fraction)``."""

    def __init__(self, style: str = "bar"):
        self.style = style
        self.stage = None
        self.bar = None
        self.started = time.perf_counter()

    def __call__(self, stage: str, fraction: float) -> None:
        if self.style == "none":
            return
        if self.style == "json":
            print(json.dumps({"stage": stage, "fraction": round(float(fraction), 4),
                              "elapsed_s": round(time.perf_counter() - self.started, 2)}), flush=True)
            return
        from tqdm import tqdm
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{stage:<14}", unit="%", file=sys.stderr, leave=True,
                            bar_format="{desc} {bar} {percentage:3.0f}% [{elapsed}]")
        self.bar.n = int(round(100 * fraction))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

"""``samir register-batch PAIRS.csv``: many registrations, spread over the ranks of a ``torchrun`` job.

The pairs file is a CSV (or JSON) with columns ``fixed, moving`` and optionally ``fixed_seg,
moving_seg, fixed_mask, moving_mask, name, out`` (relative paths are relative to the file). Pair
``i`` goes to rank ``i mod WORLD_SIZE``; each pair is written like ``samir register`` writes it, to
``OUT/<name>`` (or the row's ``out``). A pair that fails with an input error is recorded and the
others go on. Rank 0 then writes ``OUT/batch_summary.csv`` (one row per pair, in file order) and
``OUT/batch_summary.json``.
"""
from __future__ import annotations

import csv
import json
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from .datasets import read_pairs_file
from .distributed import DistributedContext, init_distributed, shutdown_distributed
from .geometry import SAMIRInputError
from .io import PathLike
from .register import ProgressFn, RegistrationOptions

SUMMARY_COLUMNS = ("index", "name", "status", "rank", "device", "dice_before_mean", "dice_after_mean", "sdlogj",
                   "folding_percent", "time_s", "out", "error")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "pair"


def register_batch(pairs_file: PathLike, out_dir: PathLike, options: Optional[RegistrationOptions] = None,
                   context: Optional[DistributedContext] = None, progress: ProgressFn = None,
                   transform_format: str = "h5") -> List[dict]:
    """Register every pair of ``pairs_file`` (this rank's share); returns all rows on rank 0, this rank's otherwise."""
    from .pipeline import run_registration
    options = options or RegistrationOptions()
    own_context = context is None
    context = context or init_distributed(options.device)
    try:
        if context.enabled and options.device == "auto":
            options = replace(options, device=str(context.device))
        options.validate()
        rows = read_pairs_file(Path(pairs_file))
        out_dir = Path(out_dir)
        scratch = out_dir / ".batch"
        scratch.mkdir(parents=True, exist_ok=True)
        mine = []
        for index, row in context.shard(list(enumerate(rows))):
            target = Path(row["out"]) if row.get("out") else out_dir / safe_name(row["name"])
            record = {"index": index, "name": row["name"], "rank": context.rank, "device": options.device,
                      "out": str(target)}
            start = time.perf_counter()
            try:
                summary = run_registration(row["fixed"], row["moving"], target,
                                           moving_seg_path=row.get("moving_seg") or None,
                                           fixed_seg_path=row.get("fixed_seg") or None,
                                           fixed_mask_path=row.get("fixed_mask") or None,
                                           moving_mask_path=row.get("moving_mask") or None, options=options,
                                           progress=progress, transform_format=transform_format)
                record.update({"status": "ok", "device": summary.get("device", options.device),
                               "sdlogj": summary["sdlogj"], "folding_percent": summary["folding_percent"],
                               "dice_before_mean": summary.get("dice_before_mean"),
                               "dice_after_mean": summary.get("dice_after_mean")})
            except SAMIRInputError as exc:
                record.update({"status": "error", "error": str(exc)})
            record["time_s"] = time.perf_counter() - start
            mine.append(record)
        (scratch / f"rank{context.rank}.json").write_text(json.dumps(mine))
        context.barrier()
        if not context.is_main:
            return mine
        everything = []
        for rank in range(context.world_size):
            path = scratch / f"rank{rank}.json"
            if path.is_file():
                everything.extend(json.loads(path.read_text()))
                path.unlink()
        try:
            scratch.rmdir()
        except OSError:
            pass
        everything.sort(key=lambda r: r["index"])
        with open(out_dir / "batch_summary.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            for record in everything:
                writer.writerow({k: ("" if record.get(k) is None else record.get(k)) for k in SUMMARY_COLUMNS})
        (out_dir / "batch_summary.json").write_text(json.dumps(
            {"pairs": len(rows), "ok": sum(r["status"] == "ok" for r in everything),
             "failed": sum(r["status"] != "ok" for r in everything), "world_size": context.world_size,
             "rows": everything}, indent=2))
        return everything
    finally:
        if own_context:
            shutdown_distributed(context)

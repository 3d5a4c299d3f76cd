"""Result files: OUT.json (everything) and OUT.md (the headline columns as a markdown table)."""
from __future__ import annotations

import json
from pathlib import Path

from ..fsutil import write_text_atomic

# (row key, column title, format); a column appears when any row has its key
COLUMNS = [("file_mb", "file MB", "{:.1f}"), ("cold_s", "cold one-image s", "{:.2f}"), ("fd_effnetl0", "FD-EffNetL0 ↓", "{:.1f}"), ("kid_effnetl0", "KID ↓", "{:.4f}"),
           ("clip_score", "CLIP-score analogue ↑", "{:.1f}"), ("r_precision", "R-prec@10 ↑", "{:.3f}"),
           ("r_precision_se", "R-prec SE over seeds", "{:.3f}"),
           ("compositional_acc", "compositional ↑", "{:.3f}"), ("sec_per_image", "s/image ↓", "{:.3f}"),
           ("speedup", "speed-up", "{:.1f}x"), ("peak_rss_mb", "peak RSS MB", "{:.0f}")]


def markdown_table(rows: list[dict], baseline: str | None = None) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    head = "| setting | " + " | ".join(c[1] for c in cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    lines = []
    for r in rows:
        cells = ["—" if r.get(key) is None else fmt.format(r[key]) for key, _, fmt in cols]
        lines.append(f"| {r['setting']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def write_results(results: dict, out: Path):
    """OUT.json and OUT.md (a table of results["rows"]); each written whole or not at all."""
    out = Path(out)
    write_text_atomic(out.with_suffix(".json"), json.dumps(results, indent=1))
    write_text_atomic(out.with_suffix(".md"), markdown_table(results["rows"], results.get("baseline")))

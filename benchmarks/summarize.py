"""Turn pytest-benchmark JSON files into one markdown table of side-by-side ratios.

    python benchmarks/summarize.py benchmarks/results/<device>-<date>/*.json > benchmarks/results/<device>-<date>.md

Within each pytest-benchmark group, the baseline is the member whose name matches --baseline
(default: the reference, SDPA's flash backend for attention, the encoder-every-step stage 2, the
per-item DataLoader, torch's per-parameter Adam loop); every member's speedup is baseline median /
member median. Ratios only compare members of one group measured in one run, on one machine.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

_EXTRA_KEYS = (
    "peak_extra_mb",
    "peak_extra_bytes",
    "tflops",
    "TFLOP/s",
    "gbps",
    "GB/s",
    "latents_per_s",
    "speedup",
    "efficiency_vs_ideal",
    "loader_wait_fraction",
)


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def summarize(paths: list[Path], baseline: str) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    machine = {}
    for path in paths:
        data = json.loads(path.read_text())
        machine = data.get("machine_info", machine)
        for bench in data["benchmarks"]:
            groups[bench.get("group") or bench["name"]].append(bench)
    pattern = re.compile(baseline)
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('machine', '?'))}, "
        f"python {machine.get('python_version', '?')}",
        "",
    ]
    for group, members in sorted(groups.items()):
        base = next((m for m in members if pattern.search(m["name"])), None)
        dev = members[0].get("extra_info", {}).get("device", "")
        lines += [
            f"### {group}" + (f" ({dev})" if dev else ""),
            "",
            "| member | median | speedup vs baseline | extra |",
            "|---|---|---|---|",
        ]
        for m in sorted(members, key=lambda m: m["stats"]["median"]):
            med = m["stats"]["median"]
            ratio = f"{base['stats']['median'] / med:.2f}x" if base else "n/a (no baseline)"
            extra = m.get("extra_info", {})
            shown = ", ".join(
                f"{k}={extra[k]:.4g}" if isinstance(extra[k], float) else f"{k}={extra[k]}"
                for k in extra
                if any(s.lower() in k.lower() for s in _EXTRA_KEYS)
            )
            lines.append(f"| {m['name']} | {_fmt_time(med)} | {ratio} | {shown} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", type=Path)
    ap.add_argument(
        "--baseline",
        default="reference|sdpa-flash|encoder-every-step|per-item|\\[loop\\]",
        help="regex picking each group's baseline member by name",
    )
    args = ap.parse_args()
    print(summarize(args.json, args.baseline))


if __name__ == "__main__":
    main()

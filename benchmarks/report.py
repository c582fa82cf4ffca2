"""The results as one markdown page (pasted into BENCHMARKS.md), made from the JSON
document, so that a table can be made again from a saved run:

    .venv/bin/python -m benchmarks.report benchmarks/results/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _num(x: float | None, unit: str = "") -> str:
    if x is None:
        return "pending"
    if unit in ("%", "MiB") or abs(x) >= 100:
        text = f"{x:,.1f}" if abs(x) < 1e5 else f"{x:,.0f}"
    elif abs(x) >= 1 or x == 0:
        text = f"{x:.2f}"
    else:
        text = f"{x:.3f}"
    return f"{text} {unit}".strip()


def _met(claim: dict[str, Any]) -> str:
    if claim["value"] is None:
        return "pending"
    if claim["met"] is None:
        return "?" if claim["goal"] else "—"
    return "yes" if claim["met"] else "**no**"


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    if 0 < ratio < 0.01:  # "N times cheaper" reads better than 3.3e-05x
        return f"1/{1 / ratio:,.0f}"
    return f"{ratio:.3g}x"


def markdown(doc: dict[str, Any]) -> str:
    machine = doc["machine"]
    mem_gib = machine.get("memory_bytes", 0) / 2**30
    smoke_note = " (smoke: tiny sizes, figures meaningless)" if doc.get("smoke") else ""
    lines = [
        f"Run {machine.get('date_utc')}{smoke_note}"
        f" — {machine.get('cpus')} cores ({machine.get('cpu_model')}), {mem_gib:.1f} GiB,"
        f" kernel {machine.get('kernel')}, cgroup {machine.get('cgroup')},"
        f" {machine.get('engine')} ({machine.get('storage_driver')}),"
        f" Python {machine.get('python')}, boincd-containers {machine.get('boincd_containers')}"
        f" (git {machine.get('git')}); load average at start {machine.get('loadavg_at_start')},"
        f" {machine.get('containers_running_at_start')} other containers running.",
        "",
        "| # | measure | ours | baseline | ratio | docker_wrapper (same run) | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in doc["results"]:
        if result["error"]:
            last = result["error"].splitlines()[-1][:200].replace("|", "/")
            lines.append(f"| {result['name']} | **error**: {last} | | | | | | |")
        for c in result["claims"]:
            base = ""
            if c["baseline"] is not None:
                base = f"{_num(c['baseline'], c['unit'])} ({c['baseline_what']})"
            what = c["what"] + (f"; {c['note']}" if c["note"] else "")
            peer = ""
            if c.get("docker_wrapper") is not None:
                peer = f"{_num(c['docker_wrapper'], c['unit'])}"
                if c.get("docker_wrapper_ratio") is not None:
                    peer += f" (ours {_ratio(c['docker_wrapper_ratio'])})"
            lines.append(
                f"| {c['key']} | {what} | {_num(c['value'], c['unit'])} | {base} "
                f"| {_ratio(c['ratio'])} | {peer} | {c['goal']} | {_met(c)} |"
            )
    for result in doc["results"]:
        # A group's own table (e.g. a breakdown by phase), as markdown lines.
        extra = result.get("details", {}).get("extra_md")
        if extra:
            lines += ["", *extra]
    lines.append("")

    def group(r: dict[str, Any]) -> str:
        load = r.get("load_1m")
        return f"{r['name']} {r['seconds']:.0f} s" + (
            f" (load {load[0]:.2f} → {load[1]:.2f})" if load else ""
        )

    lines.append(
        f"Seconds per group (1-min load at its start → end): "
        f"{', '.join(group(r) for r in doc['results'])}."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.report RESULTS.json")
    print(markdown(json.loads(Path(sys.argv[1]).read_text())), end="")

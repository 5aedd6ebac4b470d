#!/usr/bin/env python3
"""Sets `unitune bench` and `bench.py` (diffusers) side by side as a Markdown table.

    python3 benches/diffusers/compare.py unitune.json diffusers.json

Each row is one measurement both made (same name, training mode, checkpointing and
optimizer); ratios are unitune / diffusers, so below 1 is better for unitune. Memory is the
peak above what was in use when the measurement started (the loaded models), which is what
compares across the two programs. Standard library only: it also runs where only the JSON
files are.
"""

import json
import sys


def key(result):
    return (
        result["name"],
        result.get("mode", ""),
        result.get("checkpointing", ""),
        result.get("optimizer", "adafactor") if result["name"] in ("step", "unitune_run") else "",
    )


def label(k):
    name, mode, checkpointing, optimizer = k
    parts = [name]
    if mode:
        parts.append(mode)
    if checkpointing != "":
        parts.append("checkpointed" if checkpointing else "plain")
    if optimizer:
        parts.append(optimizer)
    return ", ".join(parts)


def gb(value):
    return "-" if value is None else f"{value / 1e9:.2f}"


def ratio(ours, theirs):
    if ours is None or not theirs:
        return "-"
    return f"{ours / theirs:.2f}"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    ours_run, theirs_run = (json.load(open(path)) for path in sys.argv[1:])
    theirs = {key(r): r for r in theirs_run["results"]}
    print(f"{ours_run['arch']} at {ours_run['width']}x{ours_run['height']}, "
          f"unitune {ours_run.get('revision', '')} ({ours_run['precision']}, {ours_run['device']}) vs "
          f"diffusers {theirs_run.get('version', '')} / torch {theirs_run.get('torch', '')} "
          f"({theirs_run['precision']}, {theirs_run['device']}), {ours_run.get('threads')} threads")
    print()
    print("| measurement | unitune s | diffusers s | time ratio | unitune GB | diffusers GB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for result in ours_run["results"]:
        other = theirs.get(key(result))
        if other is None:
            continue
        mine, yours = result.get("peak_above_start_bytes"), other.get("peak_above_start_bytes")
        print(f"| {label(key(result))} | {result['seconds']:.2f} | {other['seconds']:.2f} | "
              f"{ratio(result['seconds'], other['seconds'])} | {gb(mine)} | {gb(yours)} | {ratio(mine, yours)} |")
    unmatched = [label(key(r)) for r in ours_run["results"] if key(r) not in theirs]
    if unmatched:
        print()
        print("unitune only: " + "; ".join(unmatched))


if __name__ == "__main__":
    main()

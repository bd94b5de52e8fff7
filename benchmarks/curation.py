"""Curation on the digits DDPM: what each filter of `sample.py` rejects, and whether a curated data set helps a
10-shot classifier more than an uncurated one (`evaluate.py task=utility synthetic_dir=...`).

    python benchmarks/curation.py                      # the digits DDPM of benchmarks/samplers.py (trained if absent)
    python benchmarks/curation.py --ckpt PATH --per-class 100

Writes two data sets of `--per-class` images per class with `sample.py`: uncurated (no filter) and curated
(`filter.max_copy_ratio=1/3 filter.min_class_confidence=0.5`), prints the curated run's draws, kept and rejected by
reason, then the utility table of each side by side (5 seeds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from samplers import ROOT, trained_checkpoint

FILTERS = {"uncurated": ["filter.max_copy_ratio=null"],
           "curated": ["filter.max_copy_ratio=0.3333", "filter.min_class_confidence=0.5"]}


def run(script: str, *args: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmarks" / "curation")
    args = parser.parse_args()
    ckpt = args.ckpt or trained_checkpoint()
    tables = {}
    for name, filters in FILTERS.items():
        data = args.out / name
        run("sample.py", f"ckpt_path={ckpt}", f"output_dir={data}", f"num_per_class={args.per_class}", *filters,
            "max_attempts=100000", "sampler=dpmpp", "steps=20", "overwrite=true")  # the default sampler
        records = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
        reasons = Counter(r.get("reason") for r in records if r["status"] == "rejected")
        drawn = len(records)
        why = ", ".join(f"{n} ({n / drawn:.1%}) rejected as {reason}" for reason, n in reasons.items())
        print(f"{name}: {drawn} drawn, {drawn - sum(reasons.values())} kept, {why or 'none rejected'}")
        run("evaluate.py", "task=utility", f"synthetic_dir={data}", f"output_dir={args.out / f'{name}-utility'}",
            "overwrite=true")
        tables[name] = json.loads((args.out / f"{name}-utility" / "utility.json").read_text())["accuracy"]
    print(f"{'10-shot classifier trained on':<32}" + "".join(f"{name:>16}" for name in tables))
    for condition in tables["curated"]:
        print(f"{condition:<32}" + "".join(
            f"{t[condition]['mean']:>10.3f} ±{t[condition]['std']:.3f}" for t in tables.values()))


if __name__ == "__main__":
    main()

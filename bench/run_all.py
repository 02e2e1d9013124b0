"""Run every benchmark and write bench/results.md (the table for the README's Performance section).

    python bench/run_all.py            # about 23 minutes on 2 CPU cores (ledits.py: 6, attention_masks.py: 6,
                                       # attention_override.py: 3)
    python bench/run_all.py --quick    # a smoke test, about 4 minutes

Each benchmark runs in its own process with the same options (--threads, --quick). Exit status:
1 if a model-row count (exact) misses its target or a benchmark fails; timing targets are only
reported (PASS / MISS), never fail the run.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import _common

SCRIPTS = ["rows.py", "sega_math.py", "end_to_end.py", "gpu_sync.py", "ledits.py", "attention_masks.py",
           "attention_override.py"]
HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--output", default=str(HERE / "results.md"), help="where to write the results")
    args = p.parse_args(argv)
    passed = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    sections, status = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for script in SCRIPTS:
            md = Path(tmp) / (script + ".md")
            print(f"== {script}", flush=True)
            rc = subprocess.call([sys.executable, str(HERE / script), "--markdown", str(md)] + passed, cwd=_common.ROOT)
            if rc != 0:
                status = 1
            text = md.read_text() if md.is_file() else f"### {script}\n\nFAILED (exit status {rc}).\n"
            if rc != 0 and md.is_file():
                text += f"\n**{script} exited with status {rc}.**\n"
            sections.append(text)
    summary = []
    for text in sections:
        title = text.splitlines()[0].lstrip("# ")
        cells = [c.strip() for line in text.splitlines() if line.startswith("|") for c in line.split("|")]
        counts = {v: cells.count(v) for v in ("PASS", "MISS", "FAIL", "handled") if cells.count(v)}
        skipped = "SKIP" in text and not counts
        summary.append(f"- {title}: " + ("skipped" if skipped else ", ".join(f"{n} {v}" for v, n in counts.items())))
    header = ("# comfyui-sega benchmarks\n\n"
              f"Written by `{_common.command()}`. Every timing is a ratio of runs measured side by side in one "
              "process (interleaved, medians); absolute times depend on the machine and its load and are given "
              "for context only.\n\n" + "\n".join(summary) + "\n\n")
    Path(args.output).write_text(header + "\n".join(sections))
    print(f"wrote {args.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())

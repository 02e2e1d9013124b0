"""End to end: sampling with SEGA against plain CFG, same model, same run.

The tiny random-weight SD1.5 checkpoint samples with ComfyUI's sampler (comfy.sample.sample, what
KSampler runs; euler, cfg 7.5) without SEGA and with SEGA Apply (N = 1, 2, 4 concepts, the
paper's settings with warm-up steps // 5, momentum 0.1). For each N, an untimed run counts the
model rows of both (the row ratio: the work SEGA has to add), then timed runs of all
configurations are interleaved and their medians compared:
    time ratio = median(SEGA run) / median(plain CFG run)
Target: time ratio <= 1.05 x row ratio, i.e. everything SEGA adds beyond the model rows
(hooks, noise-space conversions, the SEGA math) costs at most 5% of the run.
"""
from __future__ import annotations

import sys

import _common
import _comfy


def main(argv=None) -> int:
    p = _common.parser(__doc__)
    p.add_argument("--size", type=int, help="latent side (default 16 = 128 px, --quick 8)")
    p.add_argument("--steps", type=int, help="sampler steps (default 10, --quick 6)")
    p.add_argument("--repeats", type=int, help="interleaved timed runs per configuration (default 7, --quick 2)")
    args = p.parse_args(argv)
    _common.setup(args)
    size = args.size or (8 if args.quick else 16)
    steps = args.steps or (6 if args.quick else 10)
    repeats = args.repeats or (2 if args.quick else 7)
    counts = [1, 2, 4]

    _comfy.start()
    model, clip = _comfy.load_tiny()
    pos, neg = _comfy.encode(clip, "a photo of a man"), _comfy.encode(clip, "blurry")
    conds = [_comfy.encode(clip, t) for t in ["glasses", "a hat", "a beard", "smiling"]]
    settings = {"warmup": steps // 5}
    models = {"plain CFG": model}
    for n in counts:
        models[f"SEGA N={n}"] = _comfy.sega(model, _comfy.concepts(conds[:n], [settings] * n), 0.1)

    table_rows = []
    for name, rows, row_ratio, t, time_ratio, passed in _comfy.against_plain(models, pos, neg, steps, size, repeats):
        if name == "plain CFG":
            table_rows.append([name, rows, "1.000", f"{t:.2f}", "1.000", "-", "-"])
            continue
        table_rows.append([name, rows, f"{row_ratio:.3f}", f"{t:.2f}", f"{time_ratio:.3f}",
                           f"{time_ratio / row_ratio:.3f}", _common.verdict(passed)])
    body = _common.table(["run", "model rows", "row ratio", "median s/run", "time ratio",
                          "time ratio / row ratio (target <= 1.05)", "result"], table_rows)
    notes = (f"Latent {size}x{size}, {steps} steps, euler, cfg 7.5, batch 1; {repeats} interleaved timed runs "
             f"per configuration after one warm-up round; the tiny checkpoint's UNet is about 19 M parameters, "
             f"so a model row is cheap and the overhead of SEGA weighs more than with a real model.")
    _common.finish(args, _common.section("3. End to end: sampling time against plain CFG", body, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

// SEGA: the steps in which a concept acts, as pure functions (no DOM, no ComfyUI imports), shared by
// the SEGA Concept label (sega_concept_window.js) and the test that compares it with sega_core.
// Loaded by ComfyUI as an extension module too: it registers nothing.

export const NEVER = 10000; // the cooldown widget's default: never stops

// Mirrors sega_core.concept_acts: whether a concept edits the image at sampler step `step` (0-based),
// from its warm-up step up to, not including, its cool-down step, with a non-zero scale and a
// positive weight.
export function conceptActs(step, warmup, cooldown, scale, weight) {
  return warmup <= step && step < cooldown && scale !== 0 && weight > 0;
}

export const PERCENT_NEVER = 100; // with window_unit "percent": a cooldown of 100 or more never stops

// The label drawn on a SEGA Concept node, from its widget values: "off", "never acts",
// "steps a→b" or "steps a→end"; with window_unit "percent" (warm-up and cool-down in percent of the
// run's steps: acts at step i of N when warmup <= 100 i / N < cooldown) "a%→b%" or "a%→end"; null
// while a value is not a number.
export function windowText(scale, weight, warmup, cooldown, unit = "steps") {
  if (!Number.isFinite(warmup) || !Number.isFinite(cooldown)) return null;
  const percent = unit === "percent";
  const end = cooldown >= (percent ? PERCENT_NEVER : NEVER) ? Infinity : cooldown;
  // a concept acts from its warm-up step on, if at all
  if (!conceptActs(warmup, warmup, Infinity, scale, weight)) return "off";
  if (percent) {
    // a warm-up of 100% is past the last step: no step i < N has 100 i / N >= 100
    if (warmup >= PERCENT_NEVER || !conceptActs(warmup, warmup, end, scale, weight)) return "never acts";
    return `${warmup}%\u2192${end === Infinity ? "end" : `${cooldown}%`}`;
  }
  if (!conceptActs(warmup, warmup, end, scale, weight)) return "never acts";
  return `steps ${warmup}\u2192${end === Infinity ? "end" : String(cooldown)}`;
}

"""Per-concept settings of SEGA and their once-per-run preparation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

MASK_FROM = ("implicit", "attention", "intersect")  # where a concept acts (Concept.mask_from)
WINDOW_UNITS = ("steps", "fraction")  # how a concept's warmup and cooldown count (Concept.window_unit)


class SEGAValueError(ValueError):
    """A SEGA setting is out of range. The message names the setting and the fix."""


def concept_acts(step: int, warmup: int, cooldown: float, scale: float = 1.0, weight: float = 1.0) -> bool:
    """Whether a concept edits the image at sampler step `step` (0-based): from its warm-up step up
    to, not including, its cool-down step, with a non-zero scale and a positive weight.

    The one definition of a concept's steps: Plan.acts, Plan.rows and sega_step use it, and
    js/sega_window.js mirrors it for the SEGA Concept node's label (a test compares the two).
    """
    return warmup <= step < cooldown and scale != 0.0 and weight > 0.0


def first_step_at(fraction: float, steps: int) -> int:
    """The first step i (0 <= i <= steps) with fraction <= i / steps: where a window given as a
    fraction of a `steps`-step schedule starts or stops (steps when no step reaches it)."""
    steps = max(int(steps), 1)
    i = min(max(math.ceil(fraction * steps), 0), steps)
    # fraction * steps is rounded: settle on the exact comparison i / steps, as the definition reads
    while i > 0 and fraction <= (i - 1) / steps:
        i -= 1
    while i < steps and not fraction <= i / steps:
        i += 1
    return i


def step_window(start: float, end: Optional[float], steps: int) -> tuple:
    """(warmup, cooldown) in steps of a window [start, end) given as fractions of a `steps`-step
    schedule: the concept acts at step i when start <= i / steps < end (end None: to the end of the
    run; the cooldown is then math.inf)."""
    return first_step_at(start, steps), math.inf if end is None else first_step_at(end, steps)


@dataclass(frozen=True)
class Concept:
    """One editing concept's settings, with the paper's defaults (Sec. 3, App. D).

    scale:     edit guidance scale s_e (5); 0 turns the concept off.
    threshold: percentile lambda in [0, 1) of |edit| kept per sample and channel (0.9).
    warmup:    delta, the first sampler step (0-based) at which the edit is applied (10).
    cooldown:  the step from which the edit is zero; None never cools down.
    weight:    g_i, relative weight among concepts (1.0); negative values count as 0.
    reverse:   True moves the image away from the concept ("remove"), False towards it.
    mask_from: where the concept acts: "implicit" (its own threshold, the default), "attention"
               (LEDITS++'s cross-attention mask M1, arXiv:2311.16711) or "intersect" (both).
    window_unit: how warmup and cooldown count: "steps" (sampler steps, the default) or "fraction"
               (fractions of the run's schedule in [0, 1]: the concept acts at step i of an N-step
               schedule when warmup <= i / N < cooldown; Plan.for_steps turns them into steps).
    mask_words: the number of word tokens of the concept's text whose attention the cross-attention
               mask sums (positions 1 .. mask_words after CLIP's start token); None (the default)
               sums diffusers' 75 positions (the words, the end token and the padding).
    """

    scale: float = 5.0
    threshold: float = 0.9
    warmup: int = 10
    cooldown: Optional[int] = None
    weight: float = 1.0
    reverse: bool = False
    mask_from: str = "implicit"
    window_unit: str = "steps"
    mask_words: Optional[int] = None

    def validate(self, where: str = "SEGA Concept") -> "Concept":
        if not math.isfinite(self.scale):
            raise SEGAValueError(f"{where}: edit_scale must be a finite number, got {self.scale}.")
        if not (0.0 <= self.threshold < 1.0) or math.isnan(self.threshold):
            raise SEGAValueError(
                f"{where}: threshold must be in [0, 1) (0.9 keeps the top 10% of the edit), got {self.threshold}.")
        if not math.isfinite(self.weight):
            raise SEGAValueError(f"{where}: weight must be a finite number, got {self.weight}.")
        if self.window_unit not in WINDOW_UNITS:
            raise SEGAValueError(
                f"{where}: window_unit must be one of {', '.join(WINDOW_UNITS)}, got {self.window_unit!r}.")
        if self.window_unit == "fraction":
            if not (0.0 <= self.warmup <= 1.0):
                raise SEGAValueError(f"{where}: warmup must be a fraction of the schedule in [0, 1] "
                                     f"(0.2 = after a fifth of the steps), got {self.warmup}.")
            if self.cooldown is not None and not (0.0 <= self.cooldown <= 1.0):
                raise SEGAValueError(f"{where}: cooldown must be a fraction of the schedule in [0, 1] "
                                     f"(or off), got {self.cooldown}.")
        if self.warmup < 0:
            raise SEGAValueError(f"{where}: warmup must be >= 0 steps, got {self.warmup}.")
        if self.cooldown is not None and self.cooldown < 0:
            raise SEGAValueError(f"{where}: cooldown must be >= 0 steps (or off), got {self.cooldown}.")
        if self.mask_from not in MASK_FROM:
            raise SEGAValueError(
                f"{where}: mask_from must be one of {', '.join(MASK_FROM)}, got {self.mask_from!r}.")
        if self.mask_words is not None and (isinstance(self.mask_words, bool) or not isinstance(self.mask_words, int)
                                            or self.mask_words < 1):
            raise SEGAValueError(
                f"{where}: mask_words (the concept's word tokens the attention mask sums) must be a whole "
                f"number >= 1, or None for every position, got {self.mask_words!r}.")
        return self


@dataclass(frozen=True)
class Plan:
    """SEGA settings of one run, resolved once before sampling (not re-read per step).

    Holds plain per-concept lists: step bookkeeping stays on the host side,
    and the tensors built from them are cached per device by `sega_step`.
    """

    signed_scale: tuple  # s_e, negated for reverse concepts
    threshold: tuple
    warmup: tuple
    cooldown: tuple  # math.inf for "never"
    weight: tuple  # clamped to >= 0 as the reference does
    momentum_scale: float = 0.1  # s_m
    momentum_beta: float = 0.4  # beta_m
    mask_from: tuple = ()  # per concept: "implicit", "attention" or "intersect"; () for all implicit
    # per concept: "steps" or "fraction" while some window is a fraction of the schedule (warmup and
    # cooldown then hold fractions for those); () once every window is in steps (Plan.for_steps)
    window_unit: tuple = ()
    # per concept: the word tokens its attention mask sums (None: every position, as diffusers);
    # () when no concept sets it
    mask_words: tuple = ()

    @classmethod
    def build(cls, concepts: Sequence[Concept], momentum_scale: float = 0.1, momentum_beta: float = 0.4,
              names: Optional[Sequence[str]] = None, where: str = "SEGA") -> "Plan":
        """The plan of `concepts`, validated here and only here: a bad setting raises SEGAValueError
        naming `where` (the node), the concept (names[i], else its position) and the setting."""
        if not math.isfinite(momentum_scale):
            raise SEGAValueError(f"{where}: momentum_scale must be finite, got {momentum_scale}.")
        if not (0.0 <= momentum_beta <= 1.0):
            raise SEGAValueError(f"{where}: momentum_beta must be in [0, 1], got {momentum_beta}.")
        for i, c in enumerate(concepts):
            c.validate(f"{where}: {names[i] if names is not None else f'concept #{i + 1}'}")
        return cls(
            signed_scale=tuple(-float(c.scale) if c.reverse else float(c.scale) for c in concepts),
            threshold=tuple(float(c.threshold) for c in concepts),
            warmup=tuple(float(c.warmup) if c.window_unit == "fraction" else int(c.warmup) for c in concepts),
            cooldown=tuple(math.inf if c.cooldown is None else float(c.cooldown) if c.window_unit == "fraction"
                           else int(c.cooldown) for c in concepts),
            weight=tuple(max(float(c.weight), 0.0) for c in concepts),
            momentum_scale=float(momentum_scale),
            momentum_beta=float(momentum_beta),
            mask_from=tuple(c.mask_from for c in concepts),
            window_unit=tuple(c.window_unit for c in concepts)
            if any(c.window_unit != "steps" for c in concepts) else (),
            mask_words=tuple(c.mask_words for c in concepts)
            if any(c.mask_words is not None for c in concepts) else (),
        )

    def for_steps(self, steps: int) -> "Plan":
        """This plan with every window in steps of a `steps`-step schedule (the run's full schedule,
        known when a run starts): a window [a, b) of fractions becomes the steps i with
        a <= i / steps < b. A plan already in steps is returned as it is (the same object)."""
        if not self.window_unit:
            return self
        warmup, cooldown = list(self.warmup), list(self.cooldown)
        for c, unit in enumerate(self.window_unit):
            if unit == "fraction":
                warmup[c], cooldown[c] = step_window(self.warmup[c], None if math.isinf(self.cooldown[c])
                                                     else self.cooldown[c], steps)
        return dataclasses.replace(self, warmup=tuple(warmup), cooldown=tuple(cooldown), window_unit=())

    def _in_steps(self) -> None:
        if self.window_unit:
            raise SEGAValueError("SEGA: this plan has windows as fractions of the schedule; turn them into steps "
                                 "with Plan.for_steps(steps) when the run's step count is known.")

    def __len__(self) -> int:
        return len(self.signed_scale)

    @property
    def inert(self) -> bool:
        """True when no concept can ever change the image (empty, or every scale or weight 0)."""
        return not any(s != 0.0 and w > 0.0 for s, w in zip(self.signed_scale, self.weight))

    @property
    def attention(self) -> list:
        """Concepts whose mask needs their cross-attention map (mask_from attention or intersect)."""
        return [c for c, m in enumerate(self.mask_from) if m != "implicit"]

    def warmed(self, step: int) -> list:
        """Concepts past their warm-up at `step` (cooled-down ones included, as in the reference)."""
        self._in_steps()
        return [step >= w for w in self.warmup]

    def acts(self, step: int, inactive: Sequence[int] = ()) -> list:
        """Per concept: whether it edits the image at `step` (concept_acts), and is not `inactive`
        (e.g. outside its conditioning's timestep range)."""
        self._in_steps()
        return [concept_acts(step, self.warmup[c], self.cooldown[c], self.signed_scale[c], self.weight[c])
                and c not in inactive for c in range(len(self))]

    def rows(self, step: int) -> list:
        """Indices of the concepts whose predictions `sega_step` needs at `step`.

        A concept is left out when its edit is zero this step: cooled down, scale 0 or
        weight 0; and before its warm-up when momentum is off (its edit would only feed
        a momentum that is never applied). With momentum on, a concept feeds the momentum
        from step 0, so it is needed as if its warm-up were 0. The result equals computing
        every concept.
        """
        self._in_steps()
        use_momentum = self.momentum_scale != 0.0
        return [
            c for c in range(len(self))
            if concept_acts(step, 0 if use_momentum else self.warmup[c], self.cooldown[c], self.signed_scale[c],
                            self.weight[c])
        ]

"""What `shipyard plan --explain` adds: the best candidates and why the others lost."""

from __future__ import annotations

from collections import Counter

from shipyard.plan.plan import Candidate

SHOWN = 8


def explain_candidates(ranked: list[Candidate]) -> str:
    """The fastest layouts that fit, each against the best, then the rejections by reason."""
    fitting = [c for c in ranked if c.plan is not None]
    rejected = [c for c in ranked if c.plan is None]
    lines = [f"{len(ranked)} layouts considered, {len(fitting)} fit:"]
    best = fitting[0].plan.estimate.step_seconds if fitting else None
    for place, candidate in enumerate(fitting[:SHOWN], start=1):
        estimate = candidate.plan.estimate
        verdict = "chosen" if place == 1 else f"{estimate.step_seconds / best:.3f}× the chosen time"
        cost = (
            f", ${estimate.usd_per_million_tokens:.3f}/1M tokens"
            if estimate.usd_per_million_tokens is not None
            else ""
        )
        lines.append(
            f"  {place}. {candidate.summary}: {estimate.step_seconds * 1000:.1f} ms/step, "
            f"{estimate.tokens_per_second:,.0f} tokens/s{cost} — {verdict}"
        )
    if len(fitting) > SHOWN:
        lines.append(f"  … {len(fitting) - SHOWN} slower layouts that fit")
    if rejected:
        lines.append("did not fit or could not split:")
        reasons = Counter(_kind(c.rejected) for c in rejected)
        examples = {}
        for candidate in rejected:
            examples.setdefault(_kind(candidate.rejected), candidate)
        for kind, count in reasons.most_common():
            example = examples[kind]
            lines.append(f"  {count} × {example.rejected} (e.g. {example.summary})")
    return "\n".join(lines)


def _kind(reason: str) -> str:
    """Reasons that differ only in numbers count as one kind."""
    return "".join("#" if ch.isdigit() else ch for ch in reason)

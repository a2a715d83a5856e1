"""Stage changes with the promotion gate, shared by the CLI and the HTTP API.

A version reaches production only when its last `kassa evaluate` passed the gate (its lower confidence
bound beat production's estimate, see kassa.learn.offline.ope) or when the operator forces it; a forced
promotion says so in the stage history. Shadow, canary, candidate and archived need no gate.
"""

from __future__ import annotations

from kassa.learn.registry import ModelRegistry, ModelVersion, Stage, StageError, check_move, check_share


def gate_status(mv: ModelVersion) -> tuple[bool, str]:
    """Whether ``mv`` may go to production, and why (from its recorded evaluation)."""
    evaluation = mv.metrics.get("evaluation")
    if not isinstance(evaluation, dict):
        return False, (f"{mv.version} has no evaluation; run `kassa evaluate --placement {mv.placement} "
                       f"--candidate {mv.version}` first (or force the promotion)")
    if not evaluation.get("passed"):
        return False, f"{mv.version} failed the promotion gate: {evaluation.get('reason', 'no reason recorded')}"
    return True, str(evaluation.get("reason", "passed the promotion gate"))


def promote_version(registry: ModelRegistry, version: str, stage: Stage, *, share: float | None = None,
                    reason: str | None = None, force: bool = False, actor: str = "cli") -> ModelVersion:
    check_share(stage, share)  # an invalid field (422) whatever the version, before it is looked up
    mv = registry.get(version)
    note = reason or f"promoted to {stage}"
    if stage == "production":
        # First whether it may move at all: the production version itself, or an archived one, was refused
        # as "failed the promotion gate", and --force then met the stage rule.
        check_move(mv, stage)
        passed, why = gate_status(mv)
        if not passed and not force:
            raise StageError(why, "stage")
        note = f"{note} (forced: {why})" if not passed else f"{note} ({why})"
    return registry.promote(version, stage, share=share, reason=note, actor=actor)

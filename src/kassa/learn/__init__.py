"""Learning, by lifecycle: `serving` (what scores a decision), `online` (reward joiner, learner, loop), `offline`
(datasets, training, off-policy evaluation); the registry, rollout, canary guard, shadow scorer and registry
sync sit beside them. See docs/architecture.md."""

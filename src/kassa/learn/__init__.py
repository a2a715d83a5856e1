"""Learning: featurization for the learner, policies, the online learner, the reward joiner."""

"""Continuous learning: the reward joiner, the online VW learner and the loop that drives them and publishes."""

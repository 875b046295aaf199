"""Training: objectives, the one training loop, its guard, time budgets, a run's paths and cards."""

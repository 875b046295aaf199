"""Training: objectives, student noise, the one training loop, time budgets, the end of a job."""

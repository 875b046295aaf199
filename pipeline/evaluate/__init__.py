"""Evaluation and report: clean, corruption and perturbation passes, calibration, robustness,
pseudo-label health, figures, the report document."""

"""Evaluation: white-box accuracy, transfer across victims, adversarial retraining, input defenses, metrics."""

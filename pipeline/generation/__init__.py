"""Generation: the driver that turns a clean folder and a victim into full adversarial or cooperative copies."""

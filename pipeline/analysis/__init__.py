"""Analysis: the geometry of adversarial directions (Jetley et al.): subspaces, curvature, class sketches."""

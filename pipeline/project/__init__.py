"""The project around the stages: the run plan of a params file and the DVC profiles generated from dvc.yaml."""

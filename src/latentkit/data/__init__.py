"""Datasets latentkit can generate itself, such as the procedural shapes world."""

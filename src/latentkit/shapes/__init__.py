"""The procedural shapes world: its scenes and captions, the judge that reads pictures of
it, and `latentkit eval`. A user of the core: nothing in the core imports it."""

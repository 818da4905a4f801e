"""Built-in recipes (more are found through the ``metaopt.recipes`` entry-point group)."""

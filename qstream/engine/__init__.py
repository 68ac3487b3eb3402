"""Layer-streaming execution of a model from disk: one decoder layer resident at a time (issue 13)."""

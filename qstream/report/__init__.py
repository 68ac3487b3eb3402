"""What a person reads: the model card and the plan/run tables."""

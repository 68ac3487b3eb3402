"""What to do, from headers alone: which tensors to quantize, the ignore list and targets, the plan."""

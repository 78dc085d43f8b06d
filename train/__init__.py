"""Training: a pure sharded train step, the optimizer, and the loop that drives them."""

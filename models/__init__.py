"""Flax NNX models. They name logical axes only; `parallelism/` maps them onto a device mesh."""

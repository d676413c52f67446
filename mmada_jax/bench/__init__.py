"""`mmada-jax bench`: timed workloads (train step, text / image generation, UniGRPO step, MAGVIT) and the side-by-side
comparison with the official PyTorch code."""

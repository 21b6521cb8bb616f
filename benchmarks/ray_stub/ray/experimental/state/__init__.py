"""``ray.experimental.state`` of the GPU-check stub."""

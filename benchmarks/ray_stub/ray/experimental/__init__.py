"""``ray.experimental`` of the GPU-check stub."""

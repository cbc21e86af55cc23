"""JAX-free vocabulary every package shares: errors, tensor names, files at URIs, the TrainState type, logging; imports nothing of jaxinfra and no JAX."""

"""The typed config (its sections and checks) and its loader (YAML, overrides, bounds); JAX-free, imports only core. The shipped YAML presets are data, in jaxinfra/configs/."""

"""Compression numerics: magnitude pruning (an optax transform), each tensor's role in the forward pass, int8 rounding; imports parallel, settings and core."""

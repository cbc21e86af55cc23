"""Pure Flax NNX models: the default Transformer, its factory, the KV-cache decoder and the sliding-window sampler; never imports train, ckpt, export, hub or lm."""

"""Files other programs read, written from checkpoints: safetensors (dense, sparse, int8) and the writer; imports ckpt and what lies below it."""

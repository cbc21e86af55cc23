"""Hugging Face folders in and out: a run exported as a Llama folder, a folder read into our parameters; imports export, ckpt and below."""

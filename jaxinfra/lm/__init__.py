"""The default language-model job on top of the trainer: the run, held-out bits per byte, text from a trained run; imports train and below."""

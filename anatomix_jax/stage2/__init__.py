"""Stage 2: the frozen APM, prompts and tokens, and the language-model training of AnatomiX."""

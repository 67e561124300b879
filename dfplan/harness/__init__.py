"""Zero-shot tasks (through lm-eval) and standard-protocol perplexity for dfplan models."""

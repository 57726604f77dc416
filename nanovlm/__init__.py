"""nanovlm: a minimal vision-language model in plain PyTorch. One concept per file; see README.md."""

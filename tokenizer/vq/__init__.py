"""VQ image tokenizer: a small VQGAN-family autoencoder with an l2-normalised, low-dimensional
codebook lookup and dead-code restart (see docs/tokenizer.md for why).

Import the submodules you need (`config`, `model`, `train`, `eval`); nothing heavy happens here.
"""

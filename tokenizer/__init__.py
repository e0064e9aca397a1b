"""Image (VQ) and text (BPE) tokenizers, the joint vocabulary and the CM3 sequence format.

Plain PyTorch / `tokenizers` / numpy: nothing here imports Apache Beam, so a training team can
use it without the pipeline. Nothing heavy runs at import time.
"""

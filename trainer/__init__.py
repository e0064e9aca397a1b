"""Consumers of the token shards (phase F): `trainer.data` is the reader (deterministic shuffle,
ranks and workers, exact mid-epoch resume, CM3 masking, packing, provenance; docs/shards.md);
`trainer.model`, `trainer.train` and `trainer.sample` are the reference CM3 model, its training
loop and its sampler (docs/training.md); `trainer.config` holds their settings.

Plain PyTorch / numpy / fsspec: nothing here imports Apache Beam, so a training team can use it
without the pipeline. Nothing heavy runs at import time.
"""

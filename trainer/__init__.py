"""Consumers of the token shards (phase F): `trainer.data` is the reader (deterministic shuffle,
ranks and workers, exact mid-epoch resume, CM3 masking, packing, provenance; docs/shards.md),
over `trainer.dataset` (the shards) and `trainer.collate` (batches); `trainer.model`,
`trainer.train` (with `trainer.checkpoint` and `trainer.ranks`) and `trainer.sample` (with
`trainer.run_models`) are the reference CM3 model, its training loop and its sampler
(docs/training.md); `trainer.config` holds their settings.

Plain PyTorch / numpy / fsspec: nothing here imports Apache Beam, so a training team can use it
without the pipeline. Nothing heavy runs at import time.
"""

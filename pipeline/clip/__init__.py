"""CLIP for alignment scores and retrieval embeddings (plain PyTorch + open_clip, no Beam), so
the Beam stages, the CLI and the benchmarks share one loading path:

- `model.py`: configs, open_clip's registry and factory, safe loading of weights;
- `embed.py`: inference (`ClipEmbedder`, scores, document embeddings);
- `train.py`: contrastive training on the curated shards (`train_clip`).

The names below are the package's public surface, importable as `from pipeline.clip import ...`.
"""

from pipeline.clip.embed import ClipEmbedder, caption_scores, document_embedding, normalise, reduce_scores, text_embedding
from pipeline.clip.model import (
    BUILTIN_ARCHS,
    build_model,
    build_preprocess,
    build_tokenizer,
    load_clip,
    model_config,
    read_state_dict,
    register_model_config,
    resolve_device,
)
from pipeline.clip.train import iter_curated_samples, train_clip

__all__ = [
    "BUILTIN_ARCHS", "ClipEmbedder", "build_model", "build_preprocess", "build_tokenizer", "caption_scores",
    "document_embedding", "iter_curated_samples", "load_clip", "model_config", "normalise", "read_state_dict",
    "reduce_scores", "register_model_config", "resolve_device", "text_embedding", "train_clip",
]

"""Model definitions in Flax NNX: `vit` (DeiT-style ViT) and `llama` (Llama-architecture LM)."""

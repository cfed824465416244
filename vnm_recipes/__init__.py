"""vnm_recipes: models, data and training recipes built on the `vnm_jax` library.

Installed with the package (``pip install -e ".[recipes]"`` adds what the recipes read:
scikit-learn, matplotlib, gguf, tokenizers, safetensors). The library never imports
this package; the recipes use only `vnm_jax`'s public API.

- `models`: a DeiT-style ViT (`models.vit`) and a Llama-architecture LM (`models.llama`).
- `gguf`: Llama GGUF files (SmolLM2-135M): loading, the tokenizer, safetensors export.
- `data`: scikit-learn's digits (`data.digits`) and Python's documentation as text
  (`data.text`).
- `vit`: the ViT recipe (`python -m vnm_recipes.vit`): training, presets, the pruning
  pipeline, its reports and command line.
- `llm`: the LLM recipe (`python -m vnm_recipes.llm`): one-shot pruning, three-stage
  LoRA, compression, evaluation, reports and command line.
- `speed`: matmul timings and V/M selection for the recipes' models.
- `cli`: the ``vnm-jax`` command (``vnm-jax demo``, ``vit``, ``llm``, ``prune``,
  ``select``, ``bench``).
"""

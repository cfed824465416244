"""V:N:M pruning of a Llama language model (SmolLM2-135M-Instruct): one-shot and three-stage LoRA.

Data: the text of `pydoc_data.topics` (see `vnm_recipes.data.text`). Its last 20,480 tokens are
the held-out split; everything before is the training split, from which the calibration
windows and the LoRA batches are drawn. Perplexity uses non-overlapping 512-token windows on
the last `--eval-tokens` tokens of the held-out split (all 20,480 = 40 windows by default).

Recipes (every pruned kernel is one of the seven projections of each block; the embedding,
the tied head and the norms stay dense):

- one-shot: masks from an importance score (magnitude, Wanda or RIA, with input norms
  collected on calibration windows), optionally after a V:N:M channel permutation search
  that maximises the kept score, applied to the weights.
- three-stage LoRA (`vnm_jax.lora.three_stage_lora`): dense LoRA, sparse LoRA with a mask
  recomputed every k steps, sparse LoRA with a fixed mask, then the merge
  (W + s*a@b) * mask. The recomputed masks are Wanda (or RIA, or magnitude) masks of
  W + s*a@b with the calibration input norms, formed on each kernel's channel permutation
  (`three_stage_lora(score=, input_norms=, permutations=)`); the frozen base is bfloat16 on a
  GPU (float32 logits, loss and adapters) and float32 on the CPU, and with several devices
  the step is data-parallel under a `jax.sharding.Mesh`.
- per-layer allocation: the calibration loss increase from pruning each kernel alone with
  each candidate config, then `vnm_jax.allocate_configs` at a given average density.
- compression: `vnm_jax.layers.convert_to_vnm` compresses the merged kernels with their masks
  and permutations; every pruned projection then runs `vnm_jax.matmul.vnm_matmul` through a
  `VNMLinear` layer. The compressed model's logits are checked against the
  masked dense model's, and it generates text greedily with the KV cache.
- export: the pruned weights as .safetensors with the GGUF tensor names and (out, in) layout.

Modules: `presets` (the run settings), `pruning` (one-shot masks and permutations),
`training` (three-stage LoRA, dtype and data-parallel mesh), `allocation` (sensitivities and
the per-layer allocation), `study` (the whole perplexity-against-density study and its
presets), `compression` (the compressed model and its checks), `evaluation` (perplexity),
`reports` (the results file, its tables and the plot), `cli` (the commands below, also
`vnm-jax llm ...`).

Commands (each appends JSON records to --results, default runs/llm/results.jsonl):

    python -m vnm_recipes.llm fetch                      # download the GGUF once (~93 MB)
    python -m vnm_recipes.llm eval --eval-tokens 4096    # dense perplexity
    python -m vnm_recipes.llm prune --eval-tokens 4096 --patterns 2:4 64:2:5 64:2:8 \\
        --scores magnitude wanda ria --permute both
    python -m vnm_recipes.llm lora --pattern 64:2:5 --steps 60 --eval-tokens 4096 \\
        --compress --export runs/llm/smollm2-64-2-5.safetensors
    python -m vnm_recipes.llm report                     # markdown table of the records
    python -m vnm_recipes.llm study --preset cpu         # the whole study (~60 min, 2 cores)
"""

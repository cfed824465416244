"""Train a DeiT-style ViT on scikit-learn's digits, then prune it to V:N:M and fine-tune.

Reproduce the dense baseline (2 CPU cores are enough):

    python -m vnm_recipes.vit --epochs 40

Run the pruning pipeline (dense training, then for each V:N:M config, with and without a
channel permutation: one-shot pruning, fixed-mask fine-tuning and SR-STE), writing a
results table (markdown + JSON) and a plot of accuracy against the matmul speedup measured
on this machine in the same run:

    python -m vnm_recipes.vit --preset full --out-dir bench/results/vit_full
    vnm-jax demo                      # the "short" preset, a few minutes on 2 CPU cores

The model is `vnm_recipes.models.vit.ViT`; the data the fixed stratified split of
`vnm_recipes.data.digits` (1437 train / 360 test). Training is AdamW (weight decay on the 2D
kernels only) with linear warm-up and cosine decay, label smoothing, and random shifts of
up to one pixel as augmentation.

Modules: `training` (the training loops, dense and sparse), `presets` (the pipeline's
sizes), `pipeline` (pruning and fine-tuning every variant), `reports` (the results
records, table, JSON and plot), `checkpoint` (saving and loading a trained ViT), `cli`
(the command line, also `vnm-jax vit ...`).
"""

"""`python -m vnm_recipes.vit ...`: the ViT recipe's command line (see `vnm_recipes.vit.cli`)."""

from vnm_recipes.vit.cli import main

raise SystemExit(main())

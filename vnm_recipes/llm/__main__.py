"""`python -m vnm_recipes.llm ...`: the LLM recipe's commands (see `vnm_recipes.llm.cli`)."""

from vnm_recipes.llm.cli import main

raise SystemExit(main())

"""The data sets of the recipes: scikit-learn's digits (`digits`) and Python's own documentation as text (`text`)."""

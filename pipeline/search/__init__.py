"""The student search: a space of candidate students (space), Optuna trials that distil and measure them (study),
and the choice under the device's budgets (choose). The search stage (pipeline/stages/search.py) is the recipe."""

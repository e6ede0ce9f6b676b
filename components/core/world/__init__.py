"""The rule-checked world (issue 21): synthetic tasks, instructions and safety prompts whose correct answer,
preference order and safety label are decided by code, so every alignment stage can be measured against ground
truth. `rules` and `safety` decide; `build` makes data prep's record sets; `stats` and `evaluate` make the figures."""

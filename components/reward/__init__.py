"""Stage `reward`: helpfulness and safety reward models with the margin ranking loss (see stage.py)."""

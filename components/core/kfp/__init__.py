"""Publishing a stage's results as small KFP artifacts."""

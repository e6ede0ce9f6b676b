"""Stage rejection_sampling: best of K samples by the combined reward, then SFT on the pool (paper §3.2.3)."""

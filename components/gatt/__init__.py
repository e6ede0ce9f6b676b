"""Stage `gatt`: Ghost Attention (paper §3.3) and the instruction-adherence eval (Table 30's spirit)."""

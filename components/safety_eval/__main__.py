"""`python -m components.safety_eval`: what launched workers run (see stage.py)."""
import sys

from components.safety_eval.stage import main

sys.exit(main())

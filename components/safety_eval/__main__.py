"""`python -m kubellama.components.safety_eval`: what launched workers run (see stage.py)."""
import sys

from kubellama.components.safety_eval.stage import main

sys.exit(main())

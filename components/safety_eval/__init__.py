"""Stage `safety_eval`: safety benchmarks side by side, the promotion gate and the run's page (see stage.py)."""
import os

# Hand-written sets in the published formats (see fixtures/README.md): the demo's and the tests' benchmark data.
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

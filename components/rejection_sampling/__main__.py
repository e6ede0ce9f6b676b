import sys

from components.rejection_sampling.stage import main

sys.exit(main())

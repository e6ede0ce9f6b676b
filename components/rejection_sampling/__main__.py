import sys

from kubellama.components.rejection_sampling.stage import main

sys.exit(main())

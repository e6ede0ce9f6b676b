import sys

from kubellama.components.reward.stage import main

sys.exit(main())

import sys

from kubellama.components.ppo.stage import main

sys.exit(main())

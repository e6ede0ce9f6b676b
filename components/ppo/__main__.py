import sys

from components.ppo.stage import main

sys.exit(main())

import sys

from components.reward.stage import main

sys.exit(main())

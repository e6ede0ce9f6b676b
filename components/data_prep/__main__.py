import sys

from components.data_prep.stage import main

sys.exit(main())

import sys

from shared.tier_process import main

sys.exit(main("cloud_node"))

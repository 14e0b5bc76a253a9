import sys

from shared.tier_process import main

sys.exit(main("edge_node"))

"""`python -m tierline_edge_node --manifest FILE`: the edge tier."""
import sys

from tierline_edge_node.process import main

sys.exit(main())

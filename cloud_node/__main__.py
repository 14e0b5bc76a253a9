"""`python -m tierline_cloud_node --manifest FILE`: the cloud tier."""
import sys

from tierline_cloud_node.process import main

sys.exit(main())

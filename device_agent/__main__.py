"""`python -m tierline_device_agent --manifest FILE`: the device tier, its front door and its fleet agent."""
import sys

from tierline_device_agent.process import main

sys.exit(main())

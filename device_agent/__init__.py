"""The device tier: the pruned model, run by LiteRT on the board (engine.py), its front door for the board's
apps (agent.py, on the router's cascade), the fleet agent (fleet.py, ota.py, outbox.py), the Pi-class
profile (profile.py), and the process that runs them (process.py)."""

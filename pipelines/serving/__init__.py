"""The model service: the Ray Serve application (app.py), its request checks (protocol.py) and the explorer page."""

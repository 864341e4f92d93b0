"""Serving trained checkpoints on Ray Serve: export, generation, the HTTP app, deployment."""

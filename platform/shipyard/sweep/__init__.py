"""Ray Tune sweeps whose every trial is a Shipyard training run."""

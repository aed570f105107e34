"""GPU backends behind one Protocol: NVML (real) and simulated."""

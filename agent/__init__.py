"""The gpuwarden agent: samples GPUs (NVML or simulated), the host and the network; publishes to NATS."""

"""Scale-out tooling: accelerator specs, ahead-of-time compile checks and the memory/throughput model."""

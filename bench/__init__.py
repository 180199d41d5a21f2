"""GPU benchmarks of megaloom against a plain-PyTorch reference; see bench/RESULTS.md."""

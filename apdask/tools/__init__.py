"""Tools around the pipeline: simulators, evaluation against truth, benchmarks and the demo."""

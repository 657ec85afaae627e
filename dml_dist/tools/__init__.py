"""Tools around the trainer: benchmarks (dml-bench), the run comparison (dml-compare) and the data-path probe.
Nothing in the library imports from here."""

"""peftlab benchmarks (issue #8): `python benchmarks/run.py` runs them all and writes docs/benchmarks.md."""

"""Edgeway benchmarks: `make bench` (prints tables, writes JSON under bench/results/)."""

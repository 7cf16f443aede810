"""Benchmarks of fused-hybrid against its peers; results/ holds committed runs, with the device named."""

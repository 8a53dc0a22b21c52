"""Benchmarks (``python -m outbox_pipeline.bench``): each prints its figures beside a baseline of the same run.

The top layer beside ``cli``: it may import anything, and nothing imports it.
"""

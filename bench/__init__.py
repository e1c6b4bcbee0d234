"""Benchmarks of llama-mesh against the same workflow in-process and under Llama Deploy 0.8.1.

Run ``.venv/bin/python bench/run.py [--quick] [--skip-08]``; it prints a Markdown table.
See ``docs/benchmarks.md`` for what each figure means and the results on record.
"""

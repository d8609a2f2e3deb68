"""Benchmarks of the ENACT project.

``utils``     measurement helpers shared by the tools (peak memory, synchronised timing, JSON);
              torch only, so that the operator and attention benchmarks run where detectron2 is
              not installed.
``detector``  the whole-detector benchmark behind ``tools/benchmark.py``: plan, groups, outputs.
``runner``    one detector under measurement: config, synthetic batch, the measured steps
              (detectron2 is imported inside the functions that need it).
``report``    the detector benchmark's Markdown and progress output (no torch needed).
"""

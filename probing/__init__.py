"""What `python probe.py` runs, one module per concern. Imports run downhill, in this order, and nothing here
imports probe.py (the command line):

    metrics, features, heads      the scores, the feature store and its extraction, the probe heads
    runs                          the steps of a run every path shares: head grid, extraction, results line, saved heads
    clips, frames, finetune       the three paths: clip-level heads, beat tracking on frames, the fe / ft1 / ft2 modes
    tasks                         every task's definition (reader, windows, metrics, Table-1 columns), in one place
    models, predict, report       the encoders a probe runs, `probe.py predict`, `probe.py report` (Table 1)
"""

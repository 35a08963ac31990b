"""Evaluation of teachers and students: FID, IS, CLIP score and the distance of each student to its teacher.

`metrics` holds the metrics over local weight files (nothing is downloaded), `prompts` the prompt sets,
`run` the `evaluate` job (generation through the timings benchmark's engine), `results` the tables,
grid, CSV and history.
"""

"""Block sensitivity analysis (BK-SDM App. C): how much each block of a teacher matters.

`blocks`: the removable units of SD's U-Net and the teacher without one of them (channel-interpolation
stand-ins where shapes require one). `analysis`: the damage table, its bar chart (the paper's Fig. 19)
and a proposed layout for a target size. `job`: the `sensitivity` job kind that generates and scores.
"""

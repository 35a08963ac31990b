"""Generation timings: one record per generation, kept in SQLite, compared per device and checkpoint.

`store` keeps the records, `device` describes the machine (Jetson boards included), `recorder`
measures one generation, `stats` groups records into the comparison table, `bench` runs the paper's
protocol outside the WebUI. None of it imports the WebUI.
"""

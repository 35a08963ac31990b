"""Background jobs: a SQLite job store, a subprocess runner with a queue, the access guard and the REST API.

Core code: no WebUI imports. The WebUI adapter passes its model unload/reload as the runner's
`before_gpu_job` / `after_queue_empty` hooks and its command line to `AccessGuard.from_cmd_opts`.
"""

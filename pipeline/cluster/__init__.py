"""The CLI's jobs on a Ray cluster through Ray's Jobs API: what a job carries and how it is submitted and
followed (:mod:`.submit`), and the ``submit`` and ``jobs`` commands (:mod:`.commands`).

Importing this package does not import Ray: the CLI parses its arguments before any of it is needed.
"""
